"""Ray Tune over full 2-worker Ray Train runs: ASHA early-stops, a failed trial is retried (and resumes its
own run), outputs land, the best config reproduces, a finished study restores."""

from __future__ import annotations

import json

import pytest
import yaml

from orchestrator.core.config import ConfigError, load_config, validate_config
from orchestrator.training.train import FAULT_ENV, run_training
from orchestrator.tuning.tune import run_study

from .conftest import PDF


def study_cfg(model_dir, out, name, **tune):
    return validate_config({
        "name": name, "model": {"name_or_path": str(model_dir), "task": "causal_lm"},
        "quantization": {"bits": 4, "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"format": "pdf", "train": [str(PDF)], "max_seq_length": 128, "tokenize_actors": 1,
                 "qa": {"kind": "rules", "max_articles": 12}},
        "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 5e-3, "precision": "fp32", "eval_every": 2,
                  "warmup_ratio": 0.0, "seed": 5, "log_every": 4},
        "scaling": {"num_workers": 2},
        "tune": {"metric": "val_loss", "mode": "min", "max_concurrent_trials": 1, "grace_period": 1,
                 "reduction_factor": 2, **tune},
        "output_dir": str(out)})


def test_search_space_names_real_fields(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"tune.search_space.lora.rank: no such config field"):
        study_cfg(tiny_model_dir, tmp_path, "bad", search_space={"lora.rank": {"type": "choice", "values": [4]}})
    with pytest.raises(ConfigError, match="is a section"):
        study_cfg(tiny_model_dir, tmp_path, "bad", search_space={"lora": {"type": "choice", "values": [4]}})


def test_asha_study_retries_a_failed_trial_and_best_config_reproduces(ray_local, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    # Grid lr {5e-3, 1e-6} = 2 trials, one at a time. Rank 1 of a trial's Train run dies at step 3; Train itself
    # may not retry (max_failures=0), so the trial fails and Tune retries it (trial_max_failures=1): the retry
    # resumes the trial's own Train run from its step-2 checkpoint. The 1e-6 trial cannot keep up with the
    # 5e-3 trial at ASHA's first rung (step 2) and is stopped there, before its fault.
    monkeypatch.setenv(FAULT_ENV, "step=3,rank=1,mode=raise")
    cfg = study_cfg(tiny_model_dir, tmp_path, "study", num_samples=1, trial_max_failures=1,
                    search_space={"train.lr": {"type": "grid", "values": [5e-3, 1e-6]},
                                  "lora.r": {"type": "choice", "values": [4, 8]}})
    cfg.train.max_failures = 0
    cfg.tracking.backends = ["mlflow"]
    res = run_study(cfg)
    run = res.study_dir
    assert len(res.trials) == 2
    statuses = {t["train.lr"]: t["status"] for t in res.trials}
    assert statuses == {5e-3: "completed", 1e-6: "stopped early"}
    for t in res.trials:
        if t["status"] == "stopped early":
            assert t["evals"] < 3
        else:  # the retried trial: failed once, resumed, no optimizer step lost or repeated
            trial_dir = run / "trials" / t["trial_id"]
            assert list(trial_dir.glob(".fault-3-1")) and t["step"] == 6
            history = json.loads((trial_dir / "metrics.json").read_text())["history"]
            assert [h["step"] for h in history] == list(range(1, 7))
    assert res.best["train.lr"] == 5e-3
    table = json.loads((run / "trials.json").read_text())
    assert {t["trial_id"] for t in table} == {t["trial_id"] for t in res.trials}
    assert (run / "trials.csv").read_text().startswith("trial_id,train.lr,lora.r,best_val_loss")
    assert (run / "tune_metric.png").stat().st_size > 1000
    assert (run / "best_adapter/adapter_model.safetensors").exists()
    assert list((run / "study").rglob("events.out.tfevents.*")), "Tune writes TensorBoard event files"
    # MLflow: one parent run for the study, one child per trial (the retried trial kept its run), best tagged
    from mlflow.tracking import MlflowClient

    rec = json.loads((run / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(rec["tracking_uri"])
    runs = client.search_runs([rec["experiment_id"]])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == rec["run_id"]]
    (parent,) = [r for r in runs if r.info.run_id == rec["run_id"]]
    assert len(runs) == 3 and len(children) == 2 and parent.data.tags["job"] == "tune"
    assert {c.data.params["train.lr"] for c in children} == {"0.005", "1e-06"}
    (best_run,) = [c for c in children if c.data.tags.get("best_trial") == "true"]
    assert best_run.data.params["train.lr"] == "0.005" and parent.data.tags["best_run_id"] == best_run.info.run_id
    assert parent.data.metrics["best_val_loss"] == pytest.approx(res.best["best_val_loss"])
    assert [p.step for p in client.get_metric_history(best_run.info.run_id, "val_loss")] == [2, 4, 6]
    assert all(client.get_metric_history(c.info.run_id, "loss") for c in children)
    best = load_config(res.best_config, [f"output_dir={tmp_path / 'again'}"])
    assert best.train.lr == 5e-3 and best.lora.r == res.best["lora.r"]
    raw = yaml.safe_load(res.best_config.read_text())
    assert raw["train"]["lr"] == 5e-3
    monkeypatch.delenv(FAULT_ENV)
    again = run_training(best)
    val = min(h["val_loss"] for h in again.history if "val_loss" in h)
    assert val == pytest.approx(res.best["best_val_loss"], rel=0.02)
    # The finished study restores (Tuner.restore) without re-running anything and rewrites the same table.
    restored = run_study(cfg, resume=True)
    assert [t["trial_id"] for t in restored.trials] == [t["trial_id"] for t in res.trials]
    with pytest.raises(ConfigError, match="already holds a study"):
        run_study(cfg)


def test_optuna_searcher_samples_the_configured_space(tiny_model_dir, tmp_path):
    from orchestrator.tuning.tune import _searcher, param_space

    cfg = study_cfg(tiny_model_dir, tmp_path, "optuna", search_alg="optuna",
                    search_space={"lora.r": {"type": "choice", "values": [4, 8, 16, 32]},
                                  "train.lr": {"type": "loguniform", "low": 1e-4, "high": 5e-3},
                                  "lora.dropout": {"type": "uniform", "low": 0.0, "high": 0.2}})
    searcher = _searcher(cfg)
    assert searcher.set_search_properties(None, None, param_space(cfg))
    for i in range(5):
        s = searcher.suggest(f"t{i}")
        assert s["lora.r"] in (4, 8, 16, 32) and 1e-4 <= s["train.lr"] <= 5e-3 and 0 <= s["lora.dropout"] <= 0.2
    grid = study_cfg(tiny_model_dir, tmp_path, "g", search_alg="optuna",
                     search_space={"lora.r": {"type": "grid", "values": [4, 8]}})
    with pytest.raises(ConfigError, match="grid dimensions need tune.search_alg=random"):
        _searcher(grid)
