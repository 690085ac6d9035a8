"""`orchestrator tune CONFIG`: a Ray Tune study whose trials are full Ray Train runs.

Each trial is the training entry (:func:`orchestrator.training.train.run_training`) on the run config with the
trial's values set at their dotted paths (``lora.r``, ``train.lr``, ... any field). Inside the trial the
Train controller forwards every validation report to Tune (:class:`EvalToTune`), so the scheduler (ASHA)
compares trials on the training loop's own evaluation schedule. Trial drivers ask for
``tune.driver_cpus`` (0 by default: they only watch their Train workers, which hold the resources).

Outputs in ``output_dir/name``: ``trials.csv`` / ``trials.json`` (every trial: values, best and last
metric, status, steps, time), ``best_config.yaml`` (ready for ``orchestrator train``), ``best_adapter/``,
``tune_metric.png`` and the Tune experiment itself (``study/``: TensorBoard event files per trial; resume
with ``--resume``).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator.core.config import ConfigError, RunConfig, dump_config, load_config, set_fields
from orchestrator.core.io import atomic_dir, atomic_write_bytes, atomic_write_text
from orchestrator.reports.plots import line_plot
from orchestrator.reports.tables import cell, text_table

log = logging.getLogger(__name__)

STUDY = "study"
CHECKPOINT_PATH_KEY = "checkpoint_path"


def param_space(cfg: RunConfig) -> dict[str, Any]:
    """Tune search space from ``tune.search_space`` (dotted field -> distribution)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dim in cfg.tune.search_space.items():
        if dim.type == "choice":
            space[key] = tune.choice(dim.values)
        elif dim.type == "grid":
            space[key] = tune.grid_search(dim.values)
        elif dim.type == "uniform":
            space[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "loguniform":
            space[key] = tune.loguniform(dim.low, dim.high)
        else:  # randint: inclusive of high, as people write ranges in configs
            space[key] = tune.randint(int(dim.low), int(dim.high) + 1)
    return space


def trial_config(base: RunConfig, values: dict[str, Any], trial_dir: Path) -> RunConfig:
    """The run config of one trial: the base with the trial's values, its own run dir, and checkpoints
    ranked by the study's metric (so the best checkpoint of the best trial is kept)."""
    cfg = set_fields(base, {k: v for k, v in values.items() if k in base.tune.search_space})
    cfg.output_dir, cfg.name = str(trial_dir.parent), trial_dir.name
    cfg.train.checkpoint_metric, cfg.train.checkpoint_mode = cfg.tune.metric, cfg.tune.mode
    cfg.train.score_examples = 0  # trials are compared on tune.metric; scoring the base again in each is waste
    return cfg


def _data_dir(study_dir: Path, cfg: RunConfig) -> Path:
    from orchestrator.data.prepare import data_key

    key = json.dumps(data_key(cfg), sort_keys=True)
    return study_dir / "data" / hashlib.sha256(key.encode()).hexdigest()[:12]


def _forwarder(metric: str):
    """A Ray Train callback that hands each validation report (those carrying ``metric``) to Tune."""
    from ray.train._internal.session import get_session
    from ray.train.v2.api.callback import UserCallback

    class EvalToTune(UserCallback):
        def __init__(self) -> None:
            self._queue = get_session()._get_or_create_inter_actor_queue()

        def after_report(self, run_context, metrics, checkpoint) -> None:
            row = dict(metrics[0])
            if metric not in row:
                return
            if checkpoint:
                row[CHECKPOINT_PATH_KEY] = checkpoint.path
            self._queue.put(row)

    return EvalToTune()


def run_trial(values: dict[str, Any], base: dict[str, Any], study_dir: str, fault: str | None = None,
              tracking: dict[str, Any] | None = None) -> None:
    """Tune trainable: one full training run. A retried trial resumes its own Train run."""
    import ray.tune

    from orchestrator.data.prepare import prepare_data
    from orchestrator.training.train import FAULT_ENV, run_training

    if fault:  # fault injection for tests, handed over from the study's driver
        os.environ[FAULT_ENV] = fault
    ctx = ray.tune.get_context()
    trial_dir = Path(study_dir) / "trials" / ctx.get_trial_id()
    cfg = trial_config(RunConfig.model_validate(base), values, trial_dir)
    cfg.data.parquet_dir = str(_data_dir(Path(study_dir), cfg))
    resume = (trial_dir / "train").exists()
    run_training(cfg, resume=resume, prepared=prepare_data(cfg), callbacks=[_forwarder(cfg.tune.metric)],
                 study=tracking)


def _release_placement_group(pg_hex: str) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup

    time.sleep(5)  # let Tune stop the trial's driver first
    if ray.util.placement_group_table().get(pg_hex, {}).get("state") not in (None, "REMOVED"):
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
        log.info("released the placement group of a stopped trial (%s)", pg_hex)


class ReleaseStoppedTrials(Callback):
    """Frees the Ray Train placement group of a trial that ended while its run was still going
    (early-stopped). Ray Train's own cleaner relies on the state API, which is not always reachable
    (no dashboard, several Ray instances on one machine)."""

    def __init__(self, study_dir: str) -> None:
        self.study_dir = study_dir

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        import threading

        from orchestrator.training.loop import PLACEMENT_GROUP_FILE

        f = Path(self.study_dir) / "trials" / trial.trial_id / PLACEMENT_GROUP_FILE
        if f.exists() and not (f.parent / "adapter").exists():
            threading.Thread(target=_release_placement_group, args=(f.read_text().strip(),), daemon=True).start()


@dataclass
class StudyResult:
    study_dir: Path
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    best_config: Path
    best_adapter: Path
    cost: dict[str, Any] | None = None


def _searcher(cfg: RunConfig):
    if cfg.tune.search_alg == "optuna":
        if any(d.type == "grid" for d in cfg.tune.search_space.values()):
            raise ConfigError("tune.search_space: grid dimensions need tune.search_alg=random "
                              "(Optuna samples; use choice instead)")
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.train.seed)
    return None  # Tune's default: random sampling, with grid dimensions expanded


def _scheduler(cfg: RunConfig, max_t: int):
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t one past the last validation: a trial that runs to the end finishes by itself (writing its
    # adapter and report) instead of being stopped by ASHA at its final report.
    return ASHAScheduler(time_attr="training_iteration", metric=cfg.tune.metric, mode=cfg.tune.mode,
                         max_t=max(max_t, cfg.tune.grace_period) + 1, grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor)


def planned_steps(cfg: RunConfig, train_rows: int) -> int:
    """The optimizer steps of one full run."""
    from orchestrator.training.loop import Plan

    return Plan.make(cfg, train_rows // cfg.scaling.num_workers).total_steps


def evals_per_run(cfg: RunConfig, train_rows: int) -> int:
    """How many validation reports one full run makes (the ASHA horizon)."""
    return math.ceil(planned_steps(cfg, train_rows) / cfg.train.eval_every)


def _bind_ray_train() -> None:
    """Ray Tune's Tuner reads ``ray.train.ScalingConfig`` as an attribute of the ``ray`` package. After some
    Ray Train runs in the same process that attribute was found unbound while ``ray.train`` stayed in
    ``sys.modules`` (so importing it again does not bind it); bind it back."""
    import sys

    import ray
    import ray.train  # noqa: F401

    if "train" not in vars(ray):
        ray.train = sys.modules["ray.train"]


def check_study(cfg: RunConfig, resume: bool) -> None:
    """A search space to search, and a study folder that is new (or, resuming, one that holds a study)."""
    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space is empty: name at least one field to search over")
    run_dir = Path(cfg.run_dir)
    if (run_dir / STUDY).exists() and not resume:
        raise ConfigError(f"{run_dir} already holds a study; pass --resume to continue it, "
                          f"or choose another name (--set name=...)")
    if resume and not (run_dir / STUDY).exists():
        raise ConfigError(f"--resume: {run_dir} holds no study to resume")


def run_study(cfg: RunConfig, resume: bool = False) -> StudyResult:
    """Run (or resume) the study and write the trial table, best config, best adapter and plot."""
    import ray.tune
    from ray.tune import RunConfig as TuneRunConfig
    from ray.tune import Tuner

    from orchestrator.data.prepare import prepare_data

    _bind_ray_train()
    check_study(cfg, resume)
    run_dir = Path(cfg.run_dir)
    study_path = run_dir / STUDY
    base = copy.deepcopy(cfg)
    base.data.parquet_dir = str(_data_dir(run_dir, base))
    prepared = prepare_data(base)  # once on the driver; trials with the same data section re-read it
    train_rows = prepared.datasets["train"].count()
    max_t = evals_per_run(base, train_rows)

    from orchestrator.core import tracking
    from orchestrator.core.console import console
    from orchestrator.training.train import FAULT_ENV

    study_tracking = tracking.start_study(cfg, nodes=sum(1 for n in ray.nodes() if n.get("Alive")))
    trainable = ray.tune.with_parameters(run_trial, base=base.model_dump(mode="json"), study_dir=str(run_dir),
                                         fault=os.environ.get(FAULT_ENV), tracking=study_tracking)
    # Tune refuses an all-zero request; a token of logical memory lets a 0-CPU driver schedule anywhere.
    trainable = ray.tune.with_resources(trainable, {"CPU": cfg.tune.driver_cpus, "memory": 2**20})
    if resume:
        tuner = Tuner.restore(str(study_path), trainable=trainable, resume_errored=True)
    else:
        tuner = Tuner(
            trainable, param_space=param_space(cfg),
            tune_config=ray.tune.TuneConfig(num_samples=cfg.tune.num_samples, search_alg=_searcher(cfg),
                                            scheduler=_scheduler(cfg, max_t),
                                            max_concurrent_trials=cfg.tune.max_concurrent_trials,
                                            # a stopped trial's actor must die (and its Train run with it),
                                            # never be handed to the next trial while still training
                                            reuse_actors=False),
            run_config=TuneRunConfig(name=STUDY, storage_path=str(run_dir), callbacks=[ReleaseStoppedTrials(str(run_dir))],
                                     verbose=0 if console.file else 1,  # the quiet console: our table at the end
                                     failure_config=ray.tune.FailureConfig(max_failures=cfg.tune.trial_max_failures)))
    with console.library_prints():  # Tune prints its banner and results path whatever its verbosity
        grid = tuner.fit()
    result = write_study_outputs(cfg, run_dir, grid, planned_steps(base, train_rows))
    tracking.end_study(study_tracking, run_dir, result.trials, result.best, cfg.tune.metric, result.cost)
    for line in tracking.where_to_look(run_dir):
        print(line)
    return result


def _status(result, trial_dir: Path) -> str:
    if result.error is not None:
        return "error"
    if (trial_dir / "adapter").exists():
        return "completed"
    return "stopped early"


def write_study_outputs(cfg: RunConfig, run_dir: Path, grid, planned: int | None = None) -> StudyResult:
    """Trial table (CSV/JSON, printed), best config YAML, best adapter, the metric plot and the study's cost
    (``planned``: one full run's steps, what an early-stopped trial did not run)."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    better = min if mode == "min" else max
    keys = list(cfg.tune.search_space)
    trials, curves = [], {}
    for i, r in enumerate(grid):
        df = r.metrics_dataframe
        cfg_values = {k: r.config.get(k) for k in keys}
        tid = (r.metrics or {}).get("trial_id") or (Path(r.path).name if r.path else f"trial-{i}")
        trial_dir = run_dir / "trials" / tid
        values = [] if df is None or metric not in df else [v for v in df[metric].tolist() if v == v]
        curves[tid] = values
        best_i = None
        if values:
            best_i = values.index(better(values))
        trials.append({
            "trial_id": tid, **cfg_values,
            f"best_{metric}": values[best_i] if values else None,
            f"last_{metric}": values[-1] if values else None,
            "evals": len(values), "step": (r.metrics or {}).get("step"),
            "status": _status(r, trial_dir),
            "time_s": round(float((r.metrics or {}).get("time_total_s") or 0.0), 1),
            "best_checkpoint": (df[CHECKPOINT_PATH_KEY].tolist()[best_i]
                                if best_i is not None and CHECKPOINT_PATH_KEY in df else None),
            "error": str(r.error).splitlines()[0][:300] if r.error is not None else None,
        })
    trials.sort(key=lambda t: t["trial_id"])
    scored = [t for t in trials if t[f"best_{metric}"] is not None]
    if not scored:
        raise RuntimeError(f"{run_dir}: no trial reported {metric}; see the errors in {run_dir / STUDY}")
    best = better(scored, key=lambda t: t[f"best_{metric}"])

    best_cfg = set_fields(cfg, {k: best[k] for k in keys})
    best_cfg.name = f"{cfg.name}-best"
    best_config = run_dir / "best_config.yaml"
    atomic_write_text(best_config, f"# best trial {best['trial_id']} of study {cfg.name}: "
                                   f"{metric}={best[f'best_{metric}']:.6g}\n" + dump_config(best_cfg))
    best_adapter = run_dir / "best_adapter"
    if best["best_checkpoint"]:
        with atomic_dir(best_adapter) as tmp:
            shutil.copytree(Path(best["best_checkpoint"]) / "adapter", tmp, dirs_exist_ok=True)
    _write_table(run_dir, trials)
    atomic_write_bytes(run_dir / "tune_metric.png", line_plot(
        {tid + (" (best)" if tid == best["trial_id"] else ""): list(enumerate(ys, 1)) for tid, ys in curves.items()},
        f"{metric} per trial", metric, "validation round (training_iteration)",
        bold=f"{best['trial_id']} (best)", figsize=(7, 3.8)))
    print(format_table(trials))
    print(f"best trial {best['trial_id']}: {metric}={best[f'best_{metric}']:.6g}  "
          + " ".join(f"{k}={best[k]}" for k in keys))
    cost = write_study_cost(cfg, run_dir, trials, planned)
    print(f"best config:  {best_config}\nbest adapter: {best_adapter}\ntrials:       {run_dir / 'trials.csv'}\n"
          f"tensorboard:  tensorboard --logdir {run_dir / STUDY}")
    return StudyResult(run_dir, trials, best, best_config, best_adapter, cost)


def write_study_cost(cfg: RunConfig, run_dir: Path, trials: list[dict[str, Any]], planned: int | None
                     ) -> dict[str, Any]:
    """The trials' costs summed (each finished trial's metrics.json; a stopped one's time on its resources) and
    what early stopping saved, into cost.json and one printed line."""
    from orchestrator.reports.cost import study_cost

    def trial_cost(tid: str) -> dict[str, Any] | None:
        f = run_dir / "trials" / tid / "metrics.json"
        return json.loads(f.read_text()).get("cost") if f.is_file() else None

    cost = study_cost(cfg, [t | {"cost": trial_cost(t["trial_id"])} for t in trials],
                      planned or max((t.get("step") or 0) for t in trials))
    atomic_write_text(run_dir / "cost.json", json.dumps(cost, indent=2))
    unit = "GPU-hours" if cfg.scaling.use_gpu else "CPU core-hours"
    key = "gpu_hours" if cfg.scaling.use_gpu else "cpu_core_hours"
    print(f"study cost: {cost[key]:.3f} {unit} (${cost['usd']:.2f}) over {cost['trials']} trials; early stopping "
          f"({cost['stopped_early']} stopped) saved {cost['saved_' + key]:.3f} {unit} (${cost['saved_usd']:.2f})")
    return cost


def _write_table(run_dir: Path, trials: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(trials[0]))
    w.writeheader()
    w.writerows(trials)
    atomic_write_text(run_dir / "trials.csv", buf.getvalue())
    atomic_write_text(run_dir / "trials.json", json.dumps(trials, indent=2, default=str))


def format_table(trials: list[dict[str, Any]]) -> str:
    cols = [c for c in trials[0] if c not in ("best_checkpoint", "error")]
    return text_table([cols] + [[cell(t[c]) for c in cols] for t in trials], rule=True)


def run_tune(config: str | Path, overrides: list[str] | None = None, resume: bool = False) -> StudyResult:
    """Entry for `orchestrator tune` and jobs/tune.py."""
    from orchestrator.core.runtime import init_ray
    from orchestrator.data.base import ensure_model

    cfg = load_config(config, overrides)
    check_study(cfg, resume)  # before Ray starts: nothing is written for a refused study
    ensure_model(cfg)  # built on first use, or a one-line error, before Ray starts
    init_ray(log_file=cfg.run_dir / "ray.log")
    return run_study(cfg, resume=resume)
