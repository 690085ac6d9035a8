"""Multi-node on one machine (ray.cluster_utils.Cluster): a 2-worker training with placement SPREAD runs
one worker per node, and when a node dies mid-run the run resumes from its last checkpoint on the node
that replaces it, with no optimizer step lost or repeated."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from orchestrator.config import validate_config
from orchestrator.train import PLACEMENT_GROUP_FILE, run_training

from .conftest import PDF, start_local_ray


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    was_local = ray.is_initialized()
    ray.shutdown()  # the session's single-node instance; restored below for the tests that follow
    fast = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": fast,
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if was_local:
        start_local_ray()


def test_spread_training_survives_losing_a_node(two_nodes, tiny_model_dir, tmp_path):
    import ray

    cfg = validate_config({
        "name": "spread", "model": {"name_or_path": str(tiny_model_dir), "task": "causal_lm"},
        "quantization": {"bits": 4, "compute_dtype": "float32"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"format": "pdf", "train": [str(PDF)], "max_seq_length": 128, "tokenize_actors": 1,
                 "qa": {"kind": "rules", "max_articles": 12}},
        "train": {"max_steps": 8, "micro_batch_size": 4, "lr": 5e-3, "precision": "fp32", "eval_every": 2,
                  "warmup_ratio": 0.0, "seed": 7, "log_every": 2, "max_failures": 2},
        "scaling": {"num_workers": 2, "placement_strategy": "SPREAD"}, "output_dir": str(tmp_path)})
    run_dir = Path(cfg.run_dir)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=run_training(cfg)), daemon=True)
    t.start()

    # Wait for the step-2 checkpoint, then check where the workers are and kill the second node.
    deadline = time.time() + 420
    while not list((run_dir / "train").glob("checkpoint_*/adapter")):
        assert t.is_alive() and time.time() < deadline, "no checkpoint appeared"
        time.sleep(1)
    pg = (run_dir / PLACEMENT_GROUP_FILE).read_text().strip()
    nodes = set(ray.util.placement_group_table()[pg]["bundles_to_node_id"].values())
    assert len(nodes) == 2, "SPREAD puts the two workers on different nodes"
    victim = next(iter(two_nodes.worker_nodes))
    two_nodes.remove_node(victim, allow_graceful=False)
    two_nodes.add_node(num_cpus=2)  # what the autoscaler would do on a cluster

    t.join(timeout=600)
    assert not t.is_alive(), "training did not finish after the node was replaced"
    res = result["r"]
    assert [h["step"] for h in res.history] == list(range(1, 9)), "no optimizer step lost or repeated"
    assert (run_dir / "adapter/adapter_model.safetensors").exists()
    restarted = (run_dir / PLACEMENT_GROUP_FILE).read_text().strip()
    assert restarted != pg, "the run was restarted on a new placement group"
