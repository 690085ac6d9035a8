"""`ray job submit` as users run it: a local Ray head started with `ray start --head`, the demo pipeline
(configs/demo.yaml, shortened by --set) submitted with the Job Submission SDK and a working dir, run to
SUCCEEDED: both models trained on the head's workers, report written. The pipeline's other stages (tune, eval,
merge, serve, ask) run in the README's demo (test_readme), the single-stage jobs in its job sequence."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, forget_ray_address


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    """`ray start` flags giving a node's agents free ports: a Ray instance already running on this machine
    (the test session's own) holds the default ones, and a node whose agents cannot bind runs no job agent
    and starts no workers that need a runtime env."""
    return [f"--{opt}={free_port()}" for opt in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                  "runtime-env-agent-port", "metrics-export-port")]


@pytest.fixture
def ray_head(tmp_path):
    """A second Ray instance, as `ray start --head --block` (stopped by signal, never `ray stop`, which
    would also stop the test session's own instance). `ray start` turns on token authentication; the
    client sends the head's token (~/.ray/auth_token) as a bearer header, since a process that already
    started its own Ray instance keeps that instance's (disabled) auth mode."""
    gcs, dash = free_port(), free_port()
    ray_bin = Path(sys.executable).parent / "ray"
    # no 30 s node drain on SIGTERM (meant for Serve replicas behind live proxies; nothing is left here)
    env = {**os.environ, "RAY_DEDUP_LOGS": "1", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "ray-head.log", "w")
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
         *agent_ports()],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    from ray.job_submission import JobSubmissionClient

    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    token_file = Path.home() / ".ray" / "auth_token"
    while True:
        try:
            headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file.exists() else None
            client = JobSubmissionClient(url, headers=headers)
            client.list_jobs()
            break
        except Exception as e:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"ray start --head did not come up ({e}): "
                                   f"{(tmp_path / 'ray-head.log').read_text()[-2000:]}") from None
            time.sleep(2)
    yield client
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    forget_ray_address(gcs)
    log.close()


def test_demo_pipeline_job_succeeds_on_a_local_head(ray_head, tiny_model_dir, tmp_path):
    from ray.job_submission import JobStatus

    out = tmp_path / "out"
    sets = {
        "output_dir": str(out),
        # the test session's tiny Llama instead of building the demo's (pre-training takes minutes)
        "runs.0.set.model.name_or_path": str(tiny_model_dir), "runs.0.set.model.build_tiny": "false",
        "set.train.max_steps": 4, "set.train.eval_every": 2, "set.train.log_every": 2,
        "set.train.micro_batch_size": 4, "set.data.max_seq_length": 128, "set.data.tokenize_actors": 1,
        "set.data.max_examples": 120, "set.data.qa.max_articles": 12,
        # the other stages run in the README's demo (test_readme); here the pipeline runs as one Ray job
        "stages": "[train]",
    }
    args = " ".join(shlex.quote(f"--set={k}={v}") for k, v in sets.items())
    for attempt in range(12):  # a head whose job agent is not up yet answers "try again later", as Ray asks
        try:
            job = ray_head.submit_job(entrypoint=f"{sys.executable} jobs/pipeline.py configs/demo.yaml {args}",
                                      runtime_env={"working_dir": str(ROOT)})
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == 11:
                raise
            time.sleep(5)
    deadline = time.time() + 840
    while (status := ray_head.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "job did not finish in time:\n" + ray_head.get_job_logs(job)[-4000:]
        time.sleep(5)
    logs = ray_head.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]

    demo = out / "demo"
    for run in ("constitution-qa-tiny", "medical-ner-tiny"):
        assert (demo / run / "adapter/adapter_model.safetensors").exists()
        assert json.loads((demo / run / "metrics.json").read_text())["steps"] == 4
    report = (demo / "report.md").read_text()
    assert "| constitution-qa-tiny |" in report and "losses.png" in report
    assert (demo / "losses.png").stat().st_size > 1000
    assert f"pipeline outputs: {demo}" in logs and "[4/4" in logs  # Ray, two runs trained, the report
