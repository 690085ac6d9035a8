"""train.profile_steps: the trace summary's busy fraction and idle gaps, and the setting's validation."""

from __future__ import annotations

import pytest


def test_busy_fraction_and_gaps_from_a_trace():
    from orchestrator.training.profile import summarize_trace

    ev = [{"ph": "X", "cat": "user_annotation", "name": "optimizer_step_3", "ts": 0, "dur": 100},
          {"ph": "X", "cat": "user_annotation", "name": "optimizer_step_4", "ts": 100, "dur": 100},
          {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 10, "dur": 50},
          {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 40, "dur": 40},   # overlaps: counted once
          {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 150, "dur": 40},
          {"ph": "X", "cat": "kernel", "name": "rms_norm", "ts": 190, "dur": 10},
          {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 75, "dur": 80},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 10}]
    s = summarize_trace({"traceEvents": ev})
    assert s["steps"] == 2 and s["wall_ms"] == 0.2
    assert s["device_busy_fraction"] == pytest.approx(120 / 200)
    assert s["longest_gaps"][0] == {"ms": 0.07, "host_op": "aten::item"}  # 80 -> 150, while .item() waited
    assert s["host_ops_inclusive_ms"]["aten::item"] == 0.08
    assert s["kernels_ms"] == {"gemm": 0.13, "rms_norm": 0.01} and s["kernel_ms_total"] == 0.14


def test_profile_steps_are_validated():
    from orchestrator.core.config import ConfigError, load_config

    from .conftest import ROOT

    assert load_config(ROOT / "configs/constitution-qa-tiny.yaml", ["train.profile_steps=[3,5]"]).train.profile_steps == (3, 5)
    with pytest.raises(ConfigError, match="profile_steps"):
        load_config(ROOT / "configs/constitution-qa-tiny.yaml", ["train.profile_steps=[5,3]"])
