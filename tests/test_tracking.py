"""Experiment tracking: readers for what a run leaves (an offline W&B run, TensorBoard events), the
multi-node rule, W&B's mode. The tracked training runs are in test_train.py (they reuse its run)."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.core import tracking
from orchestrator.core.config import ConfigError


def wandb_records(offline_dir: Path):
    """Records of an offline W&B run (its .wandb file: W&B's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(offline_dir).glob("run-*.wandb")
    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            r = pb.Record()
            r.ParseFromString(buf)
            yield r


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files in ``log_dir`` (TFRecord framing around Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_store_on_several_nodes_needs_shared_storage(tmp_path):
    local = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.check_shared(local, nodes=1)  # one node: anything goes
    tracking.check_shared("http://mlflow.internal:5000", nodes=3)  # a server: fine anywhere
    with pytest.raises(ConfigError, match=r"^tracking.mlflow.tracking_uri: sqlite:///.* local store \(\S+ "
                                          r"filesystem\) on a Ray cluster of 3 nodes"):
        tracking.check_shared(local, nodes=3)
    assert tracking.filesystem_type(Path("/proc/self")) == "proc"


def test_wandb_mode_auto_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not tracking.wandb_has_key()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert tracking.wandb_has_key()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_has_key()


def test_nested_eval_metrics_flatten_to_tracker_keys():
    ner = {"examples": 3, "entity_f1": 0.5, "per_type": {"Chemical": {"precision": 1.0, "f1-score": 0.8, "support": 2},
                                                          "Disease": {"f1-score": 0.25}}, "note": "text", "ok": True}
    assert tracking.flat_metrics(ner, "eval/") == {
        "eval/examples": 3.0, "eval/entity_f1": 0.5, "eval/per_type/Chemical/precision": 1.0,
        "eval/per_type/Chemical/f1-score": 0.8, "eval/per_type/Chemical/support": 2.0,
        "eval/per_type/Disease/f1-score": 0.25}


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    """A training resumed after its driver died logs into the MLflow run it began (tracking.json)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.core.config import validate_config

    cfg = validate_config({"name": "r", "model": {"name_or_path": "tiny", "task": "causal_lm"},
                           "data": {"format": "pdf", "train": ["a.pdf"]}, "output_dir": str(tmp_path),
                           "tracking": {"backends": ["mlflow"]}})
    script = ("import json, os, sys\nfrom orchestrator.core import tracking\nfrom orchestrator.core.config import RunConfig\n"
              "cfg = RunConfig.model_validate(json.loads(sys.argv[1]))\n"
              "t = tracking.Tracker(tracking.plan(cfg), cfg)\n"
              "t.log({'loss': 2.0}, 1)\nt.log({'loss': 1.5}, 2)\nos._exit(1)  # the driver dies: no end()\n")
    died = subprocess.run([sys.executable, "-c", script, cfg.model_dump_json()], capture_output=True, text=True)
    assert died.returncode == 1, died.stderr[-2000:]
    again = tracking.Tracker(tracking.plan(cfg), cfg)
    again.log({"loss": 1.2, "step": 3}, 3)
    again.end()
    m = json.loads((tmp_path / "r" / tracking.TRACKING_FILE).read_text())["mlflow"]
    client = MlflowClient(m["tracking_uri"])
    (run,) = client.search_runs([m["experiment_id"]])
    assert run.info.run_id == m["run_id"] and run.info.status == "FINISHED"
    assert [(p.step, p.value) for p in client.get_metric_history(m["run_id"], "loss")] == [(1, 2.0), (2, 1.5),
                                                                                           (3, 1.2)]
