"""Multi-node on one machine: a head and two worker nodes, each a `ray start --block` process of its own.
A 2-worker training with placement SPREAD runs its workers on different nodes, and when a node dies
(its processes killed, as a lost machine) mid-run, the run resumes from its last checkpoint on the node
that replaces it, with no optimizer step lost or repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.core.config import ConfigError, dump_config, validate_config
from orchestrator.training.loop import PLACEMENT_GROUP_FILE
from orchestrator.training.train import run_training

from .conftest import PDF, ROOT, forget_ray_address, start_local_ray
from .test_jobs import agent_ports, free_port


class LocalCluster:
    """`ray start` processes on 127.0.0.1, each in its own process group (a node = a group to kill)."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.nodes: list[subprocess.Popen] = []
        # A cluster without token auth: this process's Ray client runs with auth disabled.
        # ... and no 30 s node drain when the head is stopped at the end
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.ray = str(Path(sys.executable).parent / "ray")
        # every port the head binds is a free one: another Ray on this machine (the session's own, a head of an
        # earlier test still stopping) may hold a default one, such as the client server's 10001
        self.head = self._start(["--head", f"--port={self.port}", "--include-dashboard=false",
                                 f"--ray-client-server-port={free_port()}"])

    def _start(self, args: list[str]) -> subprocess.Popen:
        k = len(self.nodes)  # node k carries a custom resource "node-k": how the test tells nodes apart
        log = open(self.log_dir / f"node-{k}.log", "w")
        proc = subprocess.Popen([self.ray, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                 f'--resources={{"node-{k}": 1}}', "--disable-usage-stats", *agent_ports(), *args],
                                stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True)
        self.nodes.append(proc)
        return proc

    def add_worker(self) -> subprocess.Popen:
        return self._start([f"--address=127.0.0.1:{self.port}"])

    def wait_for(self, ray, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while len(alive_nodes(ray)) < n:
            assert time.time() < deadline, (f"{n} nodes did not come up; the last node's log ends:\n"
                                            f"{(self.log_dir / f'node-{len(self.nodes) - 1}.log').read_text()[-2000:]}")
            time.sleep(1)

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def shutdown(self) -> None:
        """Worker nodes killed outright, then the head stopped."""
        for p in self.nodes[1:]:
            self.kill(p)
        self.kill(self.head, signal.SIGTERM)
        for p in self.nodes:
            try:
                p.wait(45)
            except subprocess.TimeoutExpired:
                self.kill(p)
        forget_ray_address(self.port)


def alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def connect(ray, log_dir: Path, attempts: int = 2) -> LocalCluster:
    """A head started and this process connected to it; a head that dies or does not answer within two
    minutes is stopped and a fresh one started on other ports (once), else the error names its log."""
    for attempt in range(1, attempts + 1):
        c = LocalCluster(log_dir / f"attempt-{attempt}")
        deadline = time.time() + 120
        while True:
            try:
                ray.init(address=f"127.0.0.1:{c.port}", log_to_driver=False)
                return c
            except Exception as e:
                if time.time() < deadline and c.head.poll() is None:
                    time.sleep(2)
                    continue
                ray.shutdown()
                c.shutdown()
                if attempt == attempts:
                    log = (c.log_dir / "node-0.log").read_text()[-3000:]
                    raise RuntimeError(f"the head did not come up ({e}); its log ends:\n{log}") from None
                break
    raise AssertionError("unreachable")


@pytest.fixture
def cluster(tmp_path):
    import ray

    was_local = ray.is_initialized()
    ray.shutdown()  # the session's single-node instance; restored below for the tests that follow
    c = None
    try:
        c = connect(ray, tmp_path)
        for n in (2, 3):  # one at a time: two nodes starting at once on two cores can time out
            c.add_worker()
            c.wait_for(ray, n)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield c
    finally:
        ray.shutdown()
        if c:
            c.shutdown()
        if was_local:
            start_local_ray()


def test_spread_training_survives_losing_a_node(cluster, tiny_model_dir, tmp_path):
    import ray

    cfg = validate_config({
        "name": "spread", "model": {"name_or_path": str(tiny_model_dir), "task": "causal_lm"},
        "quantization": {"bits": 4, "compute_dtype": "float32"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"format": "pdf", "train": [str(PDF)], "max_seq_length": 128, "tokenize_actors": 1,
                 "qa": {"kind": "rules", "max_articles": 12}},
        "train": {"max_steps": 8, "micro_batch_size": 4, "lr": 5e-3, "precision": "fp32", "eval_every": 2,
                  "warmup_ratio": 0.0, "seed": 7, "log_every": 2, "max_failures": 2},
        "scaling": {"num_workers": 2, "placement_strategy": "SPREAD"}, "output_dir": str(tmp_path / "out")})
    run_dir = Path(cfg.run_dir)
    # A local MLflow store (the default, in the run directory on this node's disk) would scatter the runs
    # of a multi-node cluster: refused before any work, naming the setting
    tracked = cfg.model_copy(deep=True)
    tracked.tracking.backends = ["mlflow"]
    with pytest.raises(ConfigError, match=r"^tracking.mlflow.tracking_uri: sqlite:///\S+ is a local store "
                                          r"\(\S+ filesystem\) on a Ray cluster of 3 nodes"):
        run_training(tracked)
    assert not (run_dir / "train").exists()
    # The run's driver is a process of its own, as `orchestrator train` on a cluster's head: a driver that ran
    # Ray Data on another Ray instance before (this test process, in a full suite) cannot run it here.
    cfg_file = tmp_path / "spread.yaml"
    cfg_file.write_text(dump_config(cfg))
    env = {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.port}"}
    driver_log = tmp_path / "driver.log"
    with open(driver_log, "w") as log:
        driver = subprocess.Popen([str(Path(sys.executable).parent / "orchestrator"), "train", str(cfg_file)],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Wait for the step-2 checkpoint, then see where the workers are and kill a worker's node.
        deadline = time.time() + 420
        while not list((run_dir / "train").glob("checkpoint_*/adapter")):
            assert driver.poll() is None and time.time() < deadline, \
                f"no checkpoint appeared; the driver's output ends:\n{driver_log.read_text()[-3000:]}"
            time.sleep(1)
        pg = (run_dir / PLACEMENT_GROUP_FILE).read_text().strip()
        bundle_nodes = set(ray.util.placement_group_table()[pg]["bundles_to_node_id"].values())
        assert len(bundle_nodes) == 2, "SPREAD puts the two workers on different nodes"
        head = ray.get_runtime_context().get_node_id()  # the drivers' node; Train's controller runs beside them
        victim_id = next(iter(sorted(bundle_nodes - {head})))
        victim_resources = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == victim_id)
        (k,) = (int(r.split("-")[1]) for r in victim_resources if r.startswith("node-"))
        victim = cluster.nodes[k]
        cluster.kill(victim)
        cluster.add_worker()  # what the autoscaler does on a cluster
        cluster.wait_for(ray, 3)
        rc = driver.wait(600)
    finally:
        LocalCluster.kill(driver)
    assert rc == 0, f"the run failed after the node was replaced:\n{driver_log.read_text()[-3000:]}"
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 9)), "no optimizer step lost or repeated"
    assert (run_dir / "adapter/adapter_model.safetensors").exists()
    assert (run_dir / PLACEMENT_GROUP_FILE).read_text().strip() != pg, "the run restarted on a new placement group"
    assert victim_id not in {n["NodeID"] for n in alive_nodes(ray)}
