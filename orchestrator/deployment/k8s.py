"""`orchestrator k8s CONFIG -o DIR`: a KubeRay RayJob (training) and RayService (serving) for one run config.

The RayJob's entrypoint is the job the README submits with `ray job submit` (``python jobs/STAGE.py CONFIG``),
with ``output_dir`` on a persistent volume that every pod mounts, so checkpoints, adapters and the merged model
outlive the job's cluster. The RayService's ``serveConfigV2`` is the Serve config `orchestrator serve` writes
(``deploy.app_args`` + ``deploy.serve_config``), pointed at the merged model on the same volume. Nothing is
copied by hand between the run config and the manifests. Written for KubeRay's ``ray.io/v1`` API (the tests
validate against the CRDs of KubeRay v1.7.0).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.core.config import ConfigError, RunConfig, load_config
from orchestrator.core.io import atomic_write_text
from orchestrator.core.runtime import PROJECT_ROOT
from orchestrator.deployment.launcher import HAPROXY_ENV, app_args, serve_config

KUBERAY_API = "ray.io/v1"
MOUNT = "/mnt/runs"  # where the volume holding output_dir is mounted in every pod
STAGES = ("prepare", "train", "tune", "eval", "merge")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class Cluster:
    """Where and how the run's pods run (the CLI's options)."""

    image: str
    workers: int | str = 1  # the CLI passes text; check() turns it into a positive int or a one-line error
    gpus_per_worker: int | str = 1
    namespace: str = "default"
    pvc: str = "orchestrator-runs"
    working_dir: str | None = None  # a URI of the code (zip); None: the image holds the project
    stage: str = "train"
    worker_cpus: int | str = 8
    worker_memory: str = "64Gi"
    shm: str = "16Gi"

    def check(self) -> None:
        """One-line errors for options Kubernetes or KubeRay would reject later."""
        if not self.image or not self.image.strip():
            raise ConfigError("--image: a container image with Ray and this project (or --working-dir) is required")
        for opt, field in (("--workers", "workers"), ("--gpus-per-worker", "gpus_per_worker"),
                           ("--worker-cpus", "worker_cpus")):
            value = getattr(self, field)
            if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{opt}: {value!r} is not a positive integer")
            setattr(self, field, value)
        for opt, value in (("--namespace", self.namespace), ("--pvc", self.pvc)):
            if not _NAME.match(value or "") or len(value) > 63:
                raise ConfigError(f"{opt}: {value!r} is not a Kubernetes name (lowercase letters, digits, '-')")
        if self.stage not in STAGES:
            raise ConfigError(f"--stage: {self.stage!r} is not one of {', '.join(STAGES)}")
        if not re.fullmatch(r"\d+(\.\d+)?(Ki|Mi|Gi|Ti)?", self.worker_memory):
            raise ConfigError(f"--worker-memory: {self.worker_memory!r} is not a Kubernetes quantity (e.g. 64Gi)")


def k8s_name(name: str, suffix: str) -> str:
    """A DNS-1123 name for the run (KubeRay derives pod names from it, so it stays short)."""
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40].strip("-") or "run"
    return f"{base}-{suffix}"


def _container(name: str, image: str, resources: dict[str, Any], ports: list[dict] | None = None) -> dict:
    c: dict[str, Any] = {"name": name, "image": image, "resources": resources,
                         "volumeMounts": [{"name": "runs", "mountPath": MOUNT},
                                          {"name": "dshm", "mountPath": "/dev/shm"}]}
    if ports:
        c["ports"] = ports
    return c


def _volumes(c: Cluster) -> list[dict]:
    return [{"name": "runs", "persistentVolumeClaim": {"claimName": c.pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": c.shm}}]  # NCCL's shared memory


def _ray_cluster(c: Cluster, gpu_workers: int, gpus: int, max_workers: int | None = None) -> dict[str, Any]:
    head_ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    head = {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
            "template": {"spec": {"containers": [_container("ray-head", c.image, {
                "requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}}, head_ports)],
                "volumes": _volumes(c)}}}
    limits = {"cpu": str(c.worker_cpus), "memory": c.worker_memory}
    pod: dict[str, Any] = {"volumes": _volumes(c)}
    if gpus:  # GPU pods: the GPU limit, and the taint GPU node pools usually carry
        limits["nvidia.com/gpu"] = str(gpus)
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    pod["containers"] = [_container("ray-worker", c.image, {"requests": dict(limits), "limits": limits})]
    worker = {"groupName": "gpu" if gpus else "cpu", "replicas": gpu_workers, "minReplicas": gpu_workers,
              "maxReplicas": max(gpu_workers, max_workers or gpu_workers), "rayStartParams": {},
              "template": {"spec": pod}}
    spec: dict[str, Any] = {"rayVersion": _ray_version(), "headGroupSpec": head, "workerGroupSpecs": [worker]}
    if max_workers and max_workers > gpu_workers:
        spec["enableInTreeAutoscaling"] = True
    return spec


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def _config_arg(config: str | Path) -> str:
    """The config as the job sees it: relative to the project root when it lies inside it."""
    p = Path(config).resolve()
    return str(p.relative_to(PROJECT_ROOT)) if p.is_relative_to(PROJECT_ROOT) else str(config)


def rayjob(cfg: RunConfig, config: str | Path, c: Cluster, overrides: list[str]) -> dict[str, Any]:
    """Training (or another stage) as a RayJob: the README's `ray job submit` entrypoint on its own cluster."""
    sets = " ".join(f"--set {o}" for o in [*overrides, f"output_dir={MOUNT}"])
    runtime_env: dict[str, Any] = {"env_vars": {"NCCL_NVLS_ENABLE": "0"}}
    if c.working_dir:
        runtime_env["working_dir"] = c.working_dir
    return {
        "apiVersion": KUBERAY_API, "kind": "RayJob",
        "metadata": {"name": k8s_name(cfg.name, c.stage), "namespace": c.namespace,
                     "labels": {"app.kubernetes.io/name": "orchestrator", "orchestrator/run": k8s_name(cfg.name, "run")}},
        "spec": {
            "entrypoint": f"python jobs/{c.stage}.py {_config_arg(config)} {sets}".strip(),
            "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
            "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600, "backoffLimit": 0,
            "rayClusterSpec": _ray_cluster(c, c.workers, c.gpus_per_worker),
        },
    }


def rayservice(cfg: RunConfig, c: Cluster) -> dict[str, Any]:
    """Serving as a RayService: serveConfigV2 is `orchestrator serve`'s Serve config, on the merged model that
    the RayJob's merge stage leaves on the volume; replicas and GPUs per replica come from ``serve``."""
    merged = f"{MOUNT}/{cfg.name}/merged"
    args = app_args([cfg], [merged], check=False)
    s = cfg.serve
    gpus = max(1, math.ceil(s.gpus_per_replica)) if s.gpus_per_replica > 0 else 0
    per_worker = max(1, c.gpus_per_worker // gpus) if gpus else 1  # replicas one GPU worker pod holds
    workers = max(1, math.ceil(s.autoscaling.min_replicas / per_worker))
    max_workers = max(workers, math.ceil(s.autoscaling.max_replicas / per_worker))
    cluster = _ray_cluster(c, workers, gpus * per_worker, max_workers)  # no GPUs for a CPU-served model
    # ready once every model deployment can answer (the gateway's /healthz is 503 while a replica loads)
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": 8000}, "initialDelaySeconds": 10,
                              "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 360}
    if s.ingress == "haproxy":  # read when Ray starts in each pod
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            group["template"]["spec"]["containers"][0]["env"] = [
                {"name": k, "value": v} for k, v in HAPROXY_ENV.items()]
    return {
        "apiVersion": KUBERAY_API, "kind": "RayService",
        "metadata": {"name": k8s_name(cfg.name, "serve"), "namespace": c.namespace,
                     "labels": {"app.kubernetes.io/name": "orchestrator", "orchestrator/run": k8s_name(cfg.name, "run")}},
        "spec": {"serveConfigV2": serve_config(args, "0.0.0.0", 8000), "rayClusterConfig": cluster},
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, runtimeEnvYAML) as literal blocks, as people write them."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v,
                                                             style="|" if "\n" in v else None))


def render(config: str | Path, out_dir: str | Path, cluster: Cluster, overrides: list[str] | None = None) -> list[Path]:
    """Write rayjob.yaml and rayservice.yaml for ``config`` into ``out_dir`` (each atomically)."""
    cluster.check()
    overrides = list(overrides or [])
    cfg = load_config(config, overrides + [f"output_dir={MOUNT}"])
    out = Path(out_dir)
    written = []
    for name, doc in (("rayjob.yaml", rayjob(cfg, config, cluster, overrides)), ("rayservice.yaml", rayservice(cfg, cluster))):
        path = out / name
        atomic_write_text(path, yaml.dump(doc, Dumper=_Dumper, sort_keys=False))
        written.append(path)
    return written


def run_k8s(config: str | Path, out_dir: str | Path, overrides: list[str] | None = None, **options: Any) -> list[Path]:
    """Entry for `orchestrator k8s`."""
    paths = render(config, out_dir, Cluster(**options), overrides)
    for p in paths:
        print(f"wrote {p}")
    print(f"apply: kubectl apply -f {paths[0]}   (then -f {paths[1]} once the merged model is on the volume)")
    return paths
