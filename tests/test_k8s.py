"""`orchestrator k8s`: the rendered RayJob and RayService validate against KubeRay's own CRD schemas (v1.7.0,
tests/data/kuberay) and the RayService's serveConfigV2 against Ray Serve's ServeDeploySchema; they carry what
the run config says (entrypoint, GPUs, replicas, the Serve config `orchestrator serve` writes); bad options
are one-line errors with nothing written."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator.cli import main
from orchestrator.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "constitution-qa.yaml"


def crd_schema(kind: str) -> dict:
    return json.loads(gzip.open(ROOT / "tests" / "data" / "kuberay" / f"{kind}-v1.7.0.json.gz").read())["openAPIV3Schema"]


def validate(doc: dict, kind: str) -> None:
    jsonschema.Draft7Validator(crd_schema(kind)).validate(doc)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("k8s")
    rc = main(["k8s", str(CONFIG), "-o", str(out), "--image", "ghcr.io/example/orchestrator:1.0", "--workers", "2",
               "--gpus-per-worker", "4", "--namespace", "ml", "--set", "train.lr=1e-4"])
    assert rc == 0
    return {p.stem: yaml.safe_load(p.read_text()) for p in out.glob("*.yaml")}


def test_manifests_validate_against_kuberay_crds(rendered):
    assert set(rendered) == {"rayjob", "rayservice"}
    validate(rendered["rayjob"], "rayjobs")
    validate(rendered["rayservice"], "rayservices")
    # the validator is strict where KubeRay is: a worker group without its required groupName is refused
    broken = copy.deepcopy(rendered["rayjob"])
    del broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        validate(broken, "rayjobs")
    wrong = copy.deepcopy(rendered["rayservice"])
    wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong, "rayservices")


def test_rayjob_runs_the_readme_job_on_gpu_workers_with_shared_storage(rendered):
    job = rendered["rayjob"]
    assert job["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert spec["entrypoint"] == ("python jobs/train.py configs/constitution-qa.yaml --set train.lr=1e-4 "
                                  "--set output_dir=/mnt/runs")
    assert (ROOT / "jobs" / "train.py").is_file()
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["NCCL_NVLS_ENABLE"] == "0"
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == 2
    pod = worker["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "4"
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/mnt/runs", "/dev/shm"} <= mounts
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["runs"]["persistentVolumeClaim"]["claimName"] == "orchestrator-runs"
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"


def test_rayservice_serves_what_orchestrator_serve_deploys(rendered):
    from ray.serve.schema import ServeDeploySchema

    from orchestrator.deployment.launcher import app_args, serve_config

    svc = rendered["rayservice"]["spec"]
    serve_cfg = yaml.safe_load(svc["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)  # Ray Serve's own schema for `serve deploy`
    cfg = load_config(CONFIG, ["train.lr=1e-4", "output_dir=/mnt/runs"])
    expected = yaml.safe_load(serve_config(app_args([cfg], ["/mnt/runs/constitution-qa/merged"], check=False),
                                           "0.0.0.0", 8000))
    assert serve_cfg == expected
    model = serve_cfg["applications"][0]["args"]["models"][0]
    assert model["path"] == "/mnt/runs/constitution-qa/merged"
    assert model["num_gpus"] == cfg.serve.gpus_per_replica
    assert model["autoscaling"]["max_replicas"] == cfg.serve.autoscaling.max_replicas
    worker = svc["rayClusterConfig"]["workerGroupSpecs"][0]
    gpus = int(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert worker["maxReplicas"] * gpus >= cfg.serve.autoscaling.max_replicas * cfg.serve.gpus_per_replica
    probe = svc["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": 8000}  # ready only once the models can answer


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-worker", "0"], "--gpus-per-worker: 0 is not a positive integer"),
    (["--gpus-per-worker", "two"], "--gpus-per-worker: 'two' is not a positive integer"),
    (["--workers", "-1"], "--workers: '-1' is not a positive integer"),
    (["--namespace", "ML_team"], "--namespace: 'ML_team' is not a Kubernetes name"),
    (["--stage", "deploy"], "--stage: 'deploy' is not one of"),
    (["--image", ""], "--image: a container image"),
])
def test_bad_options_are_one_line_errors_and_write_nothing(tmp_path, capsys, args, message):
    base = {"--image": "img:1"}
    argv = ["k8s", str(CONFIG), "-o", str(tmp_path / "out")]
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_cpu_served_model_gets_cpu_workers(tmp_path):
    """serve.gpus_per_replica 0: the RayService's workers ask for no GPUs (and still validate)."""
    assert main(["k8s", str(CONFIG), "-o", str(tmp_path), "--image", "img:1", "--set", "serve.gpus_per_replica=0"]) == 0
    svc = yaml.safe_load((tmp_path / "rayservice.yaml").read_text())
    validate(svc, "rayservices")
    worker = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert "nvidia.com/gpu" not in worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    job = yaml.safe_load((tmp_path / "rayjob.yaml").read_text())  # training keeps its GPU workers
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["nvidia.com/gpu"] == "1"
