"""`orchestrator plan`: the data's tokens and steps, a timed probe of real training steps, the estimate per worker
count and the fewest workers that meet a deadline; nothing of the probe left behind."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main

from .conftest import ROOT


def _sets(out, model) -> list[str]:
    sets = {"output_dir": out, "model.name_or_path": model, "model.build_tiny": "false", "data.qa.max_articles": 12,
            "data.max_seq_length": 128, "data.tokenize_actors": 1, "train.epochs": 2, "scaling.num_workers": 1}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def test_plan_times_a_probe_and_names_the_workers_for_a_deadline(ray_local, tmp_path, tiny_model_dir, capsys):
    cfg = str(ROOT / "configs/constitution-qa-tiny.yaml")
    assert main(["plan", cfg, *_sets(tmp_path, tiny_model_dir), "--probe-steps", "5", "--deadline", "0.002"]) == 0
    printed = capsys.readouterr().out
    plan = json.loads((tmp_path / "constitution-qa-tiny-plan/plan.json").read_text())
    t = plan["timing"]
    assert t["steps"] == 5 and t["device"] == "cpu" and t["step_s"] > 0 and t["tokens_per_s"] > 0
    assert t["eval_s"] > 0 and t["checkpoint_s"] > 0 and t["setup_s"] > 0
    rows = plan["by_workers"]
    assert [r["workers"] for r in rows][:3] == [1, 2, 4]
    # two epochs of the training rows at micro-batch 8: the steps halve with the workers, the estimate falls
    assert rows[0]["steps"] == 2 * -(-plan["train_rows"] // 8) and rows[1]["steps"] < rows[0]["steps"]
    assert rows[1]["wall_s"] < rows[0]["wall_s"] and rows[0]["usd"] == pytest.approx(rows[0]["hours"] * 0.045)
    assert plan["train_tokens"] > 0 and f"{plan['train_tokens']:,} tokens per epoch" in printed
    met = plan["meets_deadline"]
    assert met is None or met["wall_s"] <= 0.002 * 3600
    assert "deadline 0.002 h:" in printed and "measured: 5 probe steps on cpu" in printed
    assert not list(tmp_path.glob("constitution-qa-tiny/train"))  # the probe ran in a scratch folder

    # a stated throughput instead of a probe: steps x tokens per step / tokens per second
    assert main(["plan", cfg, *_sets(tmp_path, tiny_model_dir), "--tokens-per-s", "2000", "--gpu", "H100",
                 "--deadline", "1"]) == 0
    stated = json.loads((tmp_path / "constitution-qa-tiny-plan/plan.json").read_text())
    row = stated["by_workers"][0]
    prep = stated["timing"]["data_prep_s"]
    assert row["wall_s"] - prep == pytest.approx(row["tokens"] / 2000, rel=0.05)  # one worker, after the data
    assert stated["meets_deadline"]["workers"] == 1 and "stated: 2,000 tokens/s" in capsys.readouterr().out


def test_gpu_prices_and_peaks_by_device_name():
    from orchestrator.reports.cost import gpu_facts

    assert gpu_facts("NVIDIA H200") == (3.79, 989e12)
    assert gpu_facts("NVIDIA H100 80GB HBM3") == (2.99, 989e12)
    assert gpu_facts("NVIDIA H100 PCIe")[1] == 756e12
    assert gpu_facts("NVIDIA GH200 480GB")[0] == 3.19
    assert gpu_facts("NVIDIA A10G")[0] == 1.01 and gpu_facts("NVIDIA L40S")[1] == 362e12
    assert gpu_facts("cpu") == (None, None)


def test_a_study_sums_its_trials_and_what_early_stopping_saved():
    from orchestrator.core.config import validate_config
    from orchestrator.reports.cost import study_cost

    cfg = validate_config({"name": "s", "model": {"name_or_path": "m"}, "data": {"format": "pdf", "train": ["x.pdf"]},
                           "scaling": {"num_workers": 2, "use_gpu": True}, "cost": {"gpu_hour_usd": 2.0}})
    trials = [{"trial_id": "a", "status": "completed", "step": 100, "time_s": 3600,
               "cost": {"gpu_hours": 2.0, "usd": 4.0}},
              {"trial_id": "b", "status": "stopped early", "step": 25, "time_s": 900}]
    c = study_cost(cfg, trials, planned_steps=100)
    assert c["gpu_hours"] == pytest.approx(2.5) and c["usd"] == pytest.approx(5.0)
    # b ran 25 of 100 steps in 900 s on 2 GPUs: the 75 it did not run would have taken 2,700 s x 2 GPUs
    assert c["saved_gpu_hours"] == pytest.approx(1.5) and c["saved_usd"] == pytest.approx(3.0)
    assert c["stopped_early"] == 1 and c["trials"] == 2


def test_the_probe_times_plain_steps_not_the_validation_windows():
    """The recorder closes a validation step's window right after the step before it (~0 s) and the next window
    holds the validation and the checkpoint: neither is a step's time, nor is the first (set-up)."""
    from orchestrator.training.plan import plain_steps

    hist = [{"step_time_s": 3.2}, {"step_time_s": 1.2}, {"step_time_s": 1.3},
            {"step_time_s": 0.01, "eval_s": 2.1, "checkpoint_s": 0.1}, {"step_time_s": 4.4},
            {"step_time_s": 0.01, "eval_s": 2.0}]
    assert [h["step_time_s"] for h in plain_steps(hist)] == [1.2, 1.3]
