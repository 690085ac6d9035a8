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
    """GPU workers need that many GPUs in the connected cluster (one line naming both figures)."""
    import ray

    s = cfg.scaling
    if s.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        if gpus < s.num_workers * s.gpus_per_worker:
            raise ConfigError(f"scaling.use_gpu=true needs {s.num_workers * s.gpus_per_worker:g} GPUs; "
                              f"this Ray cluster has {gpus:g}. Set scaling.use_gpu=false to train on CPUs.")


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

    check_cluster_fits(cfg)
    check_model_source(cfg.model.name_or_path)
    check_run_dir(cfg, resume)
    track = tracking.plan(cfg, nodes=sum(1 for n in ray.nodes() if n.get("Alive")), parent=study)
    prepared = prepared or prepare_data(cfg)
    shards, rows_per_rank, val_batches_max = sharded_data(cfg, prepared)
    job = WorkerJob(run=cfg.model_dump(mode="json"), run_dir=str(cfg.run_dir), rows_per_rank=rows_per_rank,
                    val_batches_max=val_batches_max, labels=prepared.labels, tracking=track,
                    fault=os.environ.get(FAULT_ENV))
    with console.progress(f"train {cfg.name}", Plan.make(cfg, rows_per_rank).total_steps):
        result = make_trainer(cfg, job, shards, callbacks).fit()
    if result.error:
        raise result.error
    return finish_run(cfg, result)


def finish_run(cfg: RunConfig, result) -> TrainResult:
    """The best checkpoint's adapter copied to RUN_DIR/adapter, the latest's history into metrics.json, the run
    report and the adapter's model card written, the tracker told."""
    from orchestrator.core import tracking
    from orchestrator.core.io import atomic_dir
    from orchestrator.reports.cards import write_card
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
    write_run_outputs(cfg, run_dir, history, best_path=best.path)
    write_card(cfg, "adapter", adapter_dir)
    tracking.log_to_run(run_dir, artifacts=[adapter_dir / "README.md", run_dir / "report.md",
                                            run_dir / "metrics.json"], job="train")
    return TrainResult(run_dir, adapter_dir, history[-1], history, best.path)


def run_train(config: str | Path, overrides: list[str] | None = None, resume: str | None = None) -> TrainResult:
    """Entry for `orchestrator train` and jobs/train.py."""
    from orchestrator.core.runtime import init_ray
    from orchestrator.data.base import ensure_model

    cfg = load_config(config, overrides)
    if resume:
        resume_dir = Path(resume).resolve()
        cfg.output_dir, cfg.name = str(resume_dir.parent), resume_dir.name
    ensure_model(cfg)  # built on first use, or a one-line error, before Ray starts
    init_ray(log_file=cfg.run_dir / "ray.log")
    result = run_training(cfg, resume=bool(resume))
    print(f"adapter: {result.adapter_dir}\nmetrics: {result.run_dir / 'metrics.json'}\n"
          f"report:  {result.run_dir / 'report.md'}")
    from orchestrator.core.tracking import where_to_look

    for line in where_to_look(result.run_dir):
        print(line)
    return result
