"""`orchestrator train CONFIG`: QLoRA fine-tuning on Ray Train (TorchTrainer), the driver's side.

The driver checks what it can before any worker starts (the cluster's GPUs, the run directory, a resumable
checkpoint), prepares the data (Ray Data, streaming into the workers), splits it into fixed per-rank shards
(exact resume needs every rank to see the same rows in the same order), starts the workers on the recipe in
:mod:`orchestrator.training.loop`, then keeps the best checkpoint's adapter and writes the run's metrics,
report and model card.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.config import ConfigError, RunConfig, load_config
from orchestrator.training.checkpoint import STATE_FILE, check_resumable, load_state
from orchestrator.training.loop import Plan, WorkerJob, train_loop_per_worker

FAULT_ENV = "ORCHESTRATOR_FAULT"  # "step=K,rank=R,mode=raise|exit": fail once, for resume tests


def deterministic_shards(datasets: dict[str, Any], world: int) -> dict[str, Any]:
    """Split each dataset on the driver into ``world`` fixed shards named ``NAME@RANK``.

    Exact resume needs every rank to see the same rows in the same order on every run;
    streaming_split hands blocks to whichever worker asks first. Splitting here, before the
    workers take the CPUs, also keeps Ray Data's split tasks from waiting on resources."""
    out = {}
    for name, ds in datasets.items():
        if world == 1:
            parts = [ds]
        elif name == "train":  # equal shards: every rank runs the same number of steps
            parts = ds.split(world, equal=True)
        else:  # every row kept, shard sizes within one row of each other
            n = ds.count()
            parts = ds.split_at_indices([n * i // world for i in range(1, world)])
        for i, part in enumerate(parts):
            out[f"{name}@{i}"] = part
    return out


def shard_config():
    """A Ray Train DataConfig that hands rank i the shards named ``NAME@i`` (ask for ``shard_name``)."""
    from ray.train import DataConfig

    class _Shards(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kw):
            # Every rank is offered every shard (Ray Train requires each name on each rank); a rank only
            # ever asks for its own.
            return [{key: ds.iterator() for key, ds in datasets.items()} for _ in range(world_size)]

    return _Shards()


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_checkpoint: str | None


def check_cluster_fits(cfg: RunConfig) -> None:
    """The run's workers fit the connected cluster: GPU workers need that many GPUs; CPU workers that many CPUs
    where nothing can add any (a local Ray instance: no autoscaler). One line naming both figures."""
    import ray

    s = cfg.scaling
    total = ray.cluster_resources() if ray.is_initialized() else {}
    if s.use_gpu and total.get("GPU", 0) < s.num_workers * s.gpus_per_worker:
        raise ConfigError(f"scaling.use_gpu=true needs {s.num_workers * s.gpus_per_worker:g} GPUs; "
                          f"this Ray cluster has {total.get('GPU', 0):g}. Set scaling.use_gpu=false to train on CPUs.")
    need = s.num_workers * s.cpus_per_worker
    if ray.is_initialized() and total.get("CPU", 0) < need and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(f"scaling: {s.num_workers} workers x {s.cpus_per_worker:g} CPUs = {need:g} CPUs; this "
                          f"local Ray instance has {total.get('CPU', 0):g} and no autoscaler to add more (lower "
                          "scaling.num_workers or scaling.cpus_per_worker, or run on a cluster)")


class ResourceWatch:
    """While a run waits for its workers' resources, a line every minute saying what it asked for and what the
    cluster has (on a cluster an autoscaler may still add nodes; a local instance was checked before)."""

    def __init__(self, cfg: RunConfig, first_after_s: float = 30.0, every_s: float = 60.0):
        import threading

        self.cfg, self.first, self.every = cfg, first_after_s, every_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="resource-watch", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()

    def _watch(self) -> None:
        import ray

        wait = self.first
        while not self.done.wait(wait):
            wait = self.every
            try:
                pending = [pg for pg in ray.util.placement_group_table().values() if pg.get("state") == "PENDING"]
            except Exception:  # noqa: BLE001 (the watch only speaks; it never stops a run)
                return
            if not pending:
                continue
            s, have = self.cfg.scaling, ray.cluster_resources()
            gpus = f" and {have.get('GPU', 0):g} GPUs" if s.use_gpu else ""
            asked = f"{s.num_workers} workers x ({s.cpus_per_worker:g} CPU" + (
                f" + {s.gpus_per_worker:g} GPU)" if s.use_gpu else ")")
            print(f"waiting for resources: the run asks for {asked}; the cluster has {have.get('CPU', 0):g} CPUs"
                  f"{gpus} (an autoscaler may add nodes; Ctrl-C stops)", flush=True)


def check_run_dir(cfg: RunConfig, resume: bool) -> Path:
    """The run's Ray Train folder: new unless resuming, present and resumable when resuming."""
    run_dir = Path(cfg.run_dir)
    ray_dir = run_dir / "train"
    if ray_dir.exists() and not resume:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                          f"or choose another name (--set name=...)")
    if resume and not ray_dir.exists():
        raise ConfigError(f"--resume: {run_dir} holds no run to resume")
    if resume:
        check_resumable(ray_dir, cfg)
    return ray_dir


def sharded_data(cfg: RunConfig, prepared) -> tuple[dict[str, Any], int, int]:
    """Fixed per-rank shards of the training and validation splits, the training rows per rank, and the most
    validation micro-batches of any rank."""
    n = cfg.scaling.num_workers
    train_ds = prepared.datasets["train"].materialize()
    val_ds = prepared.datasets.get("validation") or prepared.datasets.get("test")
    rows = train_ds.count()
    if rows // n == 0:
        raise ConfigError(f"data: {rows} training rows cannot feed {n} workers")
    shards = deterministic_shards({"train": train_ds, "validation": val_ds.materialize()}, n)
    val_rows = [shards[f"validation@{r}"].count() for r in range(n)]
    if cfg.train.strategy == "deepspeed_zero3" and min(val_rows) == 0:
        raise ConfigError(f"data: {sum(val_rows)} validation rows leave a ZeRO-3 worker without any (each of the "
                          f"{n} workers needs at least one)")
    return shards, rows // n, max(math.ceil(v / cfg.train.micro_batch_size) for v in val_rows)


def make_trainer(cfg: RunConfig, job: WorkerJob, shards: dict[str, Any], callbacks: list | None):
    """The TorchTrainer running the recipe on ``scaling.num_workers`` workers, checkpoints ranked by the
    configured metric."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
    # Unsloth must import before transformers in its worker: a runtime env of their own keeps GPU workers off
    # the pool of processes that ran data tasks (and imported transformers) for this job
    worker_env = {"env_vars": {"ORCHESTRATOR_TRAIN_BACKEND": cfg.train.backend}} if s.use_gpu else None
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=vars(job),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                     placement_strategy=s.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        datasets=shards,
        dataset_config=shard_config(),
        run_config=RayRunConfig(
            name="train", storage_path=str(cfg.run_dir), callbacks=callbacks, worker_runtime_env=worker_env,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.train.checkpoint_metric,
                                               checkpoint_score_order=cfg.train.checkpoint_mode)))


def run_training(cfg: RunConfig, resume: bool = False, prepared=None, callbacks: list | None = None,
                 study: dict[str, Any] | None = None) -> TrainResult:
    """Fit with Ray Train and write the final adapter, metrics JSON and run report into the run dir.
    ``study``: the tracking plan of the Tune study this run is a trial of (it logs as that run's child)."""
    import ray

    from orchestrator.core import tracking
    from orchestrator.core.console import console
    from orchestrator.core.sources import check_model_source
    from orchestrator.data.prepare import prepare_data

    check_run_dir(cfg, resume)
    check_cluster_fits(cfg)
    check_model_source(cfg.model.name_or_path)
    track = tracking.plan(cfg, nodes=sum(1 for n in ray.nodes() if n.get("Alive")), parent=study)
    t0 = time.perf_counter()
    prepared = prepared or prepare_data(cfg)
    shards, rows_per_rank, val_batches_max = sharded_data(cfg, prepared)
    job = WorkerJob(run=cfg.model_dump(mode="json"), run_dir=str(cfg.run_dir), rows_per_rank=rows_per_rank,
                    val_batches_max=val_batches_max, labels=prepared.labels, tracking=track,
                    fault=os.environ.get(FAULT_ENV))
    wall = {"data_prep_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    with console.progress(f"train {cfg.name}", Plan.make(cfg, rows_per_rank).total_steps), ResourceWatch(cfg):
        result = make_trainer(cfg, job, shards, callbacks).fit()
    wall["fit_s"] = time.perf_counter() - t0
    if result.error:
        raise result.error
    return finish_run(cfg, result, wall, prepared)


def finish_run(cfg: RunConfig, result, wall: dict[str, float] | None = None, prepared=None) -> TrainResult:
    """The best checkpoint's adapter copied to RUN_DIR/adapter, the base and the adapter scored side by side, the
    latest's history into metrics.json with the run's cost, the run report and the adapter's model card written,
    the tracker told."""
    from orchestrator.core import tracking
    from orchestrator.core.io import atomic_dir
    from orchestrator.reports.cards import write_card
    from orchestrator.reports.cost import run_cost
    from orchestrator.reports.run import write_run_outputs

    run_dir = Path(cfg.run_dir)
    latest = result.checkpoint
    if latest is None:
        raise RuntimeError(f"{run_dir}: training reported no checkpoint")
    best = result.get_best_checkpoint(cfg.train.checkpoint_metric, cfg.train.checkpoint_mode) or latest
    with latest.as_directory() as d:
        history = load_state(Path(d) / STATE_FILE)["history"]
    adapter_dir = run_dir / "adapter"
    with best.as_directory() as d, atomic_dir(adapter_dir) as tmp:
        shutil.copytree(Path(d) / "adapter", tmp, dirs_exist_ok=True)
    wall = dict(wall or {})
    t0 = time.perf_counter()
    scores = score_run(cfg, adapter_dir, prepared)
    wall["scoring_s"] = time.perf_counter() - t0 if scores else 0.0
    cost = run_cost(cfg, history, wall)
    write_run_outputs(cfg, run_dir, history, best_path=best.path, scores=scores, cost=cost)
    write_card(cfg, "adapter", adapter_dir)
    figures = {"cost": cost} | ({"before_after": {k: scores[k] for k in ("base", "finetuned", "gain")}}
                                if scores else {})
    tracking.log_to_run(run_dir, figures, artifacts=[adapter_dir / "README.md", run_dir / "report.md",
                                                     run_dir / "metrics.json"], job="train")
    return TrainResult(run_dir, adapter_dir, history[-1], history, best.path)


def score_run(cfg: RunConfig, adapter_dir: Path, prepared) -> dict[str, Any] | None:
    """The base and the trained adapter scored on the first ``train.score_examples`` validation rows (a Ray task
    on one worker's resources); None when that is 0 or there are no validation rows."""
    from orchestrator.data.prepare import heldout_rows
    from orchestrator.training.scoring import before_after_on_cluster

    n = cfg.train.score_examples
    if not n:
        return None
    raw = getattr(prepared, "raw", None) or {}
    rows = (raw.get("validation") or heldout_rows(cfg, "validation") or [])[:n]
    if not rows:
        return None
    labels = getattr(prepared, "labels", None)
    r = before_after_on_cluster(cfg, adapter_dir, rows, labels)
    key = r["metric"]
    print(f"{cfg.name}: {key} on {r['examples']} validation {'sentences' if labels else 'questions'}: base "
          f"{r['base'][key]:.3f} -> fine-tuned {r['finetuned'][key]:.3f}")
    return r


def run_train(config: str | Path, overrides: list[str] | None = None, resume: str | None = None) -> TrainResult:
    """Entry for `orchestrator train` and jobs/train.py."""
    from orchestrator.core.runtime import init_ray
    from orchestrator.data.base import ensure_model

    cfg = load_config(config, overrides)
    if resume:
        resume_dir = Path(resume).resolve()
        cfg.output_dir, cfg.name = str(resume_dir.parent), resume_dir.name
    check_run_dir(cfg, bool(resume))  # before Ray starts (its log file would create the run dir)
    ensure_model(cfg)  # built on first use, or a one-line error, before Ray starts
    init_ray(log_file=cfg.run_dir / "ray.log")
    result = run_training(cfg, resume=bool(resume))
    print(f"adapter: {result.adapter_dir}\nmetrics: {result.run_dir / 'metrics.json'}\n"
          f"report:  {result.run_dir / 'report.md'}")
    from orchestrator.core.tracking import where_to_look

    for line in where_to_look(result.run_dir):
        print(line)
    return result
