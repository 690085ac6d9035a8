"""Experiment tracking: MLflow and Weights & Biases through Ray's integrations, TensorBoard event files.

The only module that imports mlflow and wandb. The driver resolves a run's trackers once
(:func:`plan`: URIs, names, reachability, the multi-node rule); rank 0 of the training loop logs through a
:class:`Tracker` (``setup_mlflow`` / ``setup_wandb`` from ``ray.air.integrations``); later stages (eval, merge,
a Tune study's end) add metrics and artifacts to the same runs through ``tracking.json`` in the run
directory. A tracker that fails is dropped with one warning: tracking never costs a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from orchestrator.core.config import ConfigError, RunConfig

TRACKING_FILE = "tracking.json"  # in a run dir: the runs this run logged to (eval and merge log there too)
# Filesystems every node of a cluster sees the same way (a local store elsewhere scatters runs over nodes)
SHARED_FS = {"nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs", "efs",
             "fuse.gcsfuse", "fuse.s3fs", "fuse.juicefs", "fuse.ceph", "fuse.glusterfs"}
_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def config_params(cfg: RunConfig) -> dict[str, str]:
    """The resolved config as parameters, keyed as ``--set`` names them (``train.lr``, ``lora.r``)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node if isinstance(node, str) else json.dumps(node)

    walk(cfg.model_dump(mode="json"), "")
    return out


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a (nested) metrics dict, nested keys joined with ``/`` (``test/per_type/Chemical/f1-score``)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, key + "/"))
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int | float) and v == v:
            out[key] = float(v)
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def run_tags(cfg: RunConfig) -> dict[str, str]:
    tags = {"base_model": cfg.model.name_or_path, "task": cfg.model.task, "data_format": cfg.data.format,
            "data_sources": ", ".join(Path(p).name for p in cfg.data.train)}
    if commit := git_commit():
        tags["git_commit"] = commit
    return tags


def is_local_uri(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or ":" not in uri


def local_path(uri: str) -> Path:
    """The file or directory a local tracking URI names."""
    for scheme in ("sqlite:///", "file://", "file:"):
        if uri.startswith(scheme):
            return Path("/" + uri[len(scheme):].lstrip("/"))
    return Path(uri)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` lies on (the longest mount point in /proc/mounts above it)."""
    path, best, fstype = path.resolve(), "", ""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in mounts:
        parts = line.split()
        if len(parts) > 2 and (str(path) + "/").startswith(parts[1].rstrip("/") + "/") and len(parts[1]) >= len(best):
            best, fstype = parts[1], parts[2]
    return fstype


def check_shared(uri: str, nodes: int, setting: str = "tracking.mlflow.tracking_uri") -> None:
    """A local store on a cluster of several nodes must lie on storage they all share (NFS, Lustre, a
    bucket mounted by FUSE...), else each node's runs would land on its own disk."""
    if nodes <= 1 or not is_local_uri(uri):
        return
    path = local_path(uri)
    fs = filesystem_type(path.parent if not path.is_dir() else path)
    if fs not in SHARED_FS:
        raise ConfigError(f"{setting}: {uri} is a local store ({fs or 'unknown'} filesystem) on a Ray cluster of "
                          f"{nodes} nodes; use an MLflow server (http://...) or a path on storage all nodes share")


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return bool(netrc.netrc().authenticators("api.wandb.ai"))
    except (OSError, netrc.NetrcParseError):
        return False


@contextlib.contextmanager
def _keep_env(name: str):
    saved = os.environ.get(name)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def _quick_mlflow():
    """MLflow's HTTP client retries a dead server for minutes by default; a probe should take seconds."""
    with contextlib.ExitStack() as stack:
        for name in _QUICK:
            stack.enter_context(_keep_env(name))
        os.environ.update(_QUICK)
        yield


def _mlflow_experiment(uri: str, name: str, artifacts: Path | None) -> str:
    """The experiment's id, created (with its artifacts beside a local store) when missing."""
    from mlflow.tracking import MlflowClient

    with _quick_mlflow():
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(name, artifact_location=artifacts.as_uri() if artifacts else None)


def plan(cfg: RunConfig, nodes: int = 1, parent: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trackers of one run, resolved on the driver: what the training loop's rank 0 and the later stages
    log to. ``parent``: a study's plan (trials log as its children, into its store). An unreachable tracker is
    dropped with one warning; a local MLflow store on several nodes without shared storage is an error."""
    t = cfg.tracking
    run_dir = Path(cfg.run_dir)
    out: dict[str, Any] = {"backends": list(t.backends), "run_name": cfg.name, "run_dir": str(run_dir),
                           "tags": run_tags(cfg)}
    if "mlflow" in t.backends:
        if parent and "mlflow" in parent:
            out["mlflow"] = {**parent["mlflow"], "parent_run_id": parent["mlflow"]["run_id"]}
            out["mlflow"].pop("run_id", None)
        else:
            uri = os.environ.get("MLFLOW_TRACKING_URI") or t.mlflow.tracking_uri or f"sqlite:///{run_dir}/mlflow.db"
            check_shared(uri, nodes)
            artifacts = None
            if is_local_uri(uri):
                local_path(uri).parent.mkdir(parents=True, exist_ok=True)
                artifacts = local_path(uri).parent / "mlartifacts"
            experiment = t.mlflow.experiment or cfg.name
            try:
                out["mlflow"] = {"tracking_uri": uri, "experiment": experiment,
                                 "experiment_id": _mlflow_experiment(uri, experiment, artifacts)}
            except Exception as e:  # noqa: BLE001 (any failure of the tracker: warn, train anyway)
                warn_dropped("mlflow", f"{uri} cannot be reached ({first_line(e)})")
                out["backends"].remove("mlflow")
    if "wandb" in t.backends:
        mode = t.wandb.mode if t.wandb.mode != "auto" else ("online" if wandb_has_key() else "offline")
        if mode == "disabled":
            out["backends"].remove("wandb")
        else:
            group = parent["wandb"]["group"] if parent and "wandb" in parent else cfg.name  # a run's jobs together
            out["wandb"] = {"project": (parent or {}).get("wandb", {}).get("project") or t.wandb.project or cfg.name,
                            "entity": t.wandb.entity, "mode": mode, "group": group, "dir": str(run_dir),
                            "id": uuid.uuid4().hex[:8]}
    return out


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def warn_dropped(backend: str, why: str) -> None:
    print(f"warning: tracking: {backend}: {why}; this run goes on without it", flush=True)


class Tracker:
    """Rank 0's loggers for one training run. Every call is guarded: a tracker that fails is dropped."""

    def __init__(self, plan_: dict[str, Any], cfg: RunConfig) -> None:
        self.plan, self.mlflow, self.wandb, self.tb = plan_, None, None, None
        self.record = read_record(Path(plan_["run_dir"]))  # a resumed run continues its tracking runs
        backends = plan_["backends"]
        if "tensorboard" in backends:
            self._guard("tensorboard", self._start_tensorboard)
        if "mlflow" in backends:
            self._guard("mlflow", self._start_mlflow, cfg)
        if "wandb" in backends:
            self._guard("wandb", self._start_wandb, cfg)
        write_record(Path(plan_["run_dir"]), self.record)

    def _guard(self, backend: str, fn, *args) -> None:
        if backend not in self.plan["backends"]:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 (tracking never costs a run)
            warn_dropped(backend, first_line(e))
            self.plan["backends"] = [b for b in self.plan["backends"] if b != backend]
            setattr(self, "tb" if backend == "tensorboard" else backend, None)

    def _start_tensorboard(self) -> None:
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(Path(self.plan["run_dir"]) / "tensorboard"))

    def _start_mlflow(self, cfg: RunConfig) -> None:
        m = self.plan["mlflow"]
        tags = {**self.plan["tags"], "job": "train"}
        if m.get("parent_run_id"):
            tags["mlflow.parentRunId"] = m["parent_run_id"]
        with _quick_mlflow(), _keep_env("MLFLOW_TRACKING_URI"):  # set_tracking_uri exports it process-wide
            if previous := self.record.get("mlflow", {}).get("run_id"):  # resumed: the same MLflow run
                import mlflow

                mlflow.set_tracking_uri(m["tracking_uri"])
                mlflow.start_run(run_id=previous)
                self.mlflow = mlflow
            else:
                from ray.air.integrations.mlflow import setup_mlflow

                self.mlflow = setup_mlflow(tracking_uri=m["tracking_uri"], experiment_id=m["experiment_id"],
                                           run_name=self.plan["run_name"], tags=tags)
                params = config_params(cfg)
                keys = sorted(params)
                for i in range(0, len(keys), 100):  # MLflow takes at most 100 parameters per call
                    self.mlflow.log_params({k: params[k] for k in keys[i:i + 100]})
        run = self.mlflow.active_run()
        self.record["mlflow"] = {**{k: v for k, v in m.items() if k != "parent_run_id"}, "run_id": run.info.run_id}

    def _start_wandb(self, cfg: RunConfig) -> None:
        from ray.air.integrations.wandb import setup_wandb

        w = self.plan["wandb"]
        run_id = self.record.get("wandb", {}).get("id") or w["id"]
        os.environ.setdefault("WANDB_SILENT", "true")
        if w["mode"] == "offline":  # Ray's setup asks for an API key unless the mode says offline
            os.environ["WANDB_MODE"] = "offline"
        Path(w["dir"]).mkdir(parents=True, exist_ok=True)
        self.wandb = setup_wandb(config=config_params(cfg), project=w["project"], entity=w["entity"], mode=w["mode"],
                                 group=w["group"], dir=w["dir"], trial_id=run_id, trial_name=self.plan["run_name"],
                                 tags=[self.plan["tags"]["task"]], notes=json.dumps(self.plan["tags"]),
                                 job_type="train", rank_zero_only=False)
        self.record["wandb"] = {**w, "id": run_id, "offline_dir": self._wandb_dir()}

    def _wandb_dir(self) -> str | None:
        d = getattr(getattr(self.wandb, "settings", None), "sync_dir", None)
        return str(d) if d and self.plan["wandb"]["mode"] == "offline" else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """One logged step's numbers (and its validation metrics) in every tracker."""
        nums = flat_metrics({k: v for k, v in metrics.items() if k not in ("step", "timestamp")})
        if self.tb is not None:
            self._guard("tensorboard", lambda: [self.tb.add_scalar(k, v, step) for k, v in nums.items()])
        if self.mlflow is not None:
            self._guard("mlflow", lambda: self.mlflow.log_metrics(nums, step=step))
        if self.wandb is not None:
            self._guard("wandb", lambda: self.wandb.log(nums, step=step))

    def end(self, ok: bool = True) -> None:
        if self.tb is not None:
            self._guard("tensorboard", self.tb.close)
        if self.mlflow is not None:
            self._guard("mlflow", lambda: self.mlflow.end_run("FINISHED" if ok else "FAILED"))
        if self.wandb is not None:
            self._guard("wandb", lambda: self.wandb.finish(exit_code=0 if ok else 1))


def read_record(run_dir: Path) -> dict[str, Any]:
    f = Path(run_dir) / TRACKING_FILE
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    from orchestrator.core.io import atomic_write_text

    if record:
        atomic_write_text(Path(run_dir) / TRACKING_FILE, json.dumps(record, indent=2))


def log_to_run(run_dir: Path, metrics: dict[str, Any] | None = None, artifacts: list[Path] = (),
               job: str = "eval", step: int | None = None) -> None:
    """Add a later stage's metrics and files (eval report, model card, merge.json) to the tracking runs of
    the training run in ``run_dir``; nothing when that run was not tracked. Failures warn, never raise."""
    record = read_record(run_dir)
    nums = flat_metrics(metrics or {}, f"{job}/")
    if m := record.get("mlflow"):
        try:
            from mlflow.tracking import MlflowClient

            with _quick_mlflow():
                client = MlflowClient(m["tracking_uri"])
                for k, v in nums.items():
                    client.log_metric(m["run_id"], k, v, step=step or 0)
                for a in artifacts:
                    if Path(a).is_file():
                        client.log_artifact(m["run_id"], str(a), artifact_path=job)
        except Exception as e:  # noqa: BLE001
            warn_dropped("mlflow", f"{job} results not logged ({first_line(e)})")
    if (w := record.get("wandb")) and job != "train":  # W&B: the training run itself logged its history
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            Path(w["dir"]).mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=w["project"], entity=w["entity"], mode=w["mode"], group=w["group"],
                             dir=w["dir"], name=f"{Path(run_dir).name}-{job}", job_type=job,
                             notes=f"{job} of W&B run {w['id']}", reinit="create_new")
            if nums:
                run.summary.update(nums)
            for a in artifacts:
                if Path(a).is_file():
                    run.save(str(a), base_path=str(Path(a).parent), policy="now")
            run.finish()
        except Exception as e:  # noqa: BLE001
            warn_dropped("wandb", f"{job} results not logged ({first_line(e)})")


def start_study(cfg: RunConfig, nodes: int = 1) -> dict[str, Any]:
    """The parent tracking run of a Tune study (its trials log as children); its plan goes to every trial."""
    p = plan(cfg, nodes)
    if "mlflow" in p:
        try:
            from mlflow.tracking import MlflowClient

            with _quick_mlflow():
                client = MlflowClient(p["mlflow"]["tracking_uri"])
                record = read_record(Path(cfg.run_dir)).get("mlflow", {})
                run_id = record.get("run_id")  # a resumed study keeps its parent run
                if run_id is None:
                    run = client.create_run(p["mlflow"]["experiment_id"], run_name=cfg.name,
                                            tags={**p["tags"], "job": "tune"})
                    run_id = run.info.run_id
                    params = {f"tune.{k}": json.dumps(v.model_dump(exclude_none=True))
                              for k, v in cfg.tune.search_space.items()}
                    params.update({k: cfg.tune.model_dump(mode="json")[k]
                                   for k in ("metric", "mode", "num_samples", "search_alg", "scheduler")})
                    client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
                p["mlflow"]["run_id"] = run_id
        except Exception as e:  # noqa: BLE001
            warn_dropped("mlflow", f"{p['mlflow']['tracking_uri']}: no study run ({first_line(e)})")
            p["backends"].remove("mlflow")
            p.pop("mlflow")
    if "wandb" in p:
        p["wandb"]["group"] = cfg.name
    write_record(Path(cfg.run_dir), {k: p[k] for k in ("mlflow", "wandb") if k in p})
    return p


def _param(k: str, v: Any):
    from mlflow.entities import Param

    return Param(k, v if isinstance(v, str) else json.dumps(v))


def end_study(study_plan: dict[str, Any], run_dir: Path, trials: list[dict[str, Any]], best: dict[str, Any],
              metric: str, cost: dict[str, Any] | None = None) -> None:
    """Tag the best trial's run, give the study run the best value and its cost, close it; W&B: a study summary
    run."""
    best_record = read_record(run_dir / "trials" / best["trial_id"])
    score = best.get(f"best_{metric}")
    costs = flat_metrics(cost or {}, "cost/")
    if "mlflow" in study_plan:
        try:
            from mlflow.tracking import MlflowClient

            m = study_plan["mlflow"]
            with _quick_mlflow():
                client = MlflowClient(m["tracking_uri"])
                if child := best_record.get("mlflow", {}).get("run_id"):
                    client.set_tag(child, "best_trial", "true")
                    client.set_tag(m["run_id"], "best_run_id", child)
                client.set_tag(m["run_id"], "best_trial_id", best["trial_id"])
                if score is not None:
                    client.log_metric(m["run_id"], f"best_{metric}", float(score))
                for k, v in costs.items():
                    client.log_metric(m["run_id"], k, v)
                client.set_terminated(m["run_id"])
        except Exception as e:  # noqa: BLE001
            warn_dropped("mlflow", f"study results not logged ({first_line(e)})")
    if "wandb" in study_plan:
        log_to_run(run_dir, ({f"best_{metric}": score} if score is not None else {}) | {"cost": cost or {}},
                   [run_dir / "trials.csv", run_dir / "best_config.yaml"], job="study")


def where_to_look(run_dir: Path) -> list[str]:
    """Lines for the console and the report: how to open this run's tracking."""
    record, lines = read_record(run_dir), []
    if m := record.get("mlflow"):
        uri = m["tracking_uri"]
        view = f"mlflow ui --backend-store-uri {uri}" if is_local_uri(uri) else uri
        lines.append(f"mlflow:       {view}  (experiment {m['experiment']}, run {m['run_id']})")
    if w := record.get("wandb"):
        path = "/".join(x for x in (w.get("entity"), w["project"], w["id"]) if x)
        if w.get("offline_dir"):
            lines.append(f"wandb:        offline run {path}; upload it (and its eval/merge runs) with: "
                         f"wandb sync {Path(w['dir']) / 'wandb'}/offline-run-*")
        else:
            lines.append(f"wandb:        run {path}")
    if (Path(run_dir) / "tensorboard").is_dir():
        lines.append(f"tensorboard:  tensorboard --logdir {Path(run_dir) / 'tensorboard'}")
    return lines
