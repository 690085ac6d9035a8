"""Run outputs: metrics JSON and a Markdown report with PNG plots of loss and evaluation curves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from orchestrator.core.config import RunConfig, dump_config
from orchestrator.core.io import atomic_write_bytes, atomic_write_text
from orchestrator.reports.plots import line_plot

log = logging.getLogger(__name__)
EVAL_KEYS = ("val_loss", "perplexity", "entity_f1", "entity_precision", "entity_recall", "token_weighted_f1")


def write_run_outputs(cfg: RunConfig, run_dir: Path, history: list[dict[str, Any]], best_path: str | None,
                      scores: dict[str, Any] | None = None, cost: dict[str, Any] | None = None) -> None:
    """metrics.json, loss.png, eval.png and report.md in ``run_dir``, each written atomically. ``scores``: the
    base and the fine-tuned adapter on the same validation rows; ``cost``: reports.cost.run_cost."""
    run_dir.mkdir(parents=True, exist_ok=True)
    evals = [h for h in history if any(k in h for k in EVAL_KEYS)]
    first, last = history[0], history[-1]
    summary = {
        "name": cfg.name, "task": cfg.model.task, "steps": last["step"], "epochs": round(last["epoch"], 3),
        "first_loss": first["loss"], "final_loss": last["loss"],
        "loss_drop": 1 - last["loss"] / first["loss"] if first["loss"] else 0.0,
        "final_eval": {k: v for k, v in (evals[-1] if evals else {}).items() if k in EVAL_KEYS},
        "best_checkpoint": best_path, "median_tokens_per_s": _median([h["tokens_per_s"] for h in history[1:]] or
                                                                     [first["tokens_per_s"]]),
        "peak_memory_mb": max(h["peak_memory_mb"] for h in history),
    }
    if scores:
        key = scores["metric"]
        summary |= {f"base_val_{key}": scores["base"][key], f"finetuned_val_{key}": scores["finetuned"][key],
                    "before_after": scores}
    if cost:
        summary["cost"] = cost
    summary["history"] = history
    atomic_write_text(run_dir / "metrics.json", json.dumps(summary, indent=2))
    try:
        import matplotlib  # noqa: F401  (a dependency; missing only in a --no-deps install)
    except ImportError:
        log.warning("matplotlib is not installed: %s/report.md is written without plots", run_dir)
        _write_report(cfg, run_dir, summary, plots=False)
        return
    atomic_write_bytes(run_dir / "loss.png", line_plot(
        {"train loss": [(h["step"], h["loss"]) for h in history],
         "val loss": [(h["step"], h["val_loss"]) for h in evals if "val_loss" in h]},
        f"{cfg.name}: loss", "loss"))
    eval_keys = ["entity_f1", "entity_precision", "entity_recall", "token_weighted_f1"] \
        if cfg.model.task == "token_classification" else ["perplexity"]
    atomic_write_bytes(run_dir / "eval.png", line_plot(
        {k: [(h["step"], h[k]) for h in evals if k in h] for k in eval_keys},
        f"{cfg.name}: validation", "value", log_y=cfg.model.task == "causal_lm"))
    _write_report(cfg, run_dir, summary, plots=True)


def _write_report(cfg: RunConfig, run_dir: Path, summary: dict[str, Any], plots: bool) -> None:
    fe = summary["final_eval"]
    sections = before_after_section(summary.get("before_after")) + cost_section(summary.get("cost"))
    figures = "![loss](loss.png)\n\n![validation](eval.png)" if plots else "(plots need matplotlib)"
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in fe.items())
    from orchestrator.core.tracking import where_to_look

    looks = where_to_look(run_dir)
    tracked = ("\n## Tracking\n\n" + "\n".join(f"    {line}" for line in looks) + "\n") if looks else ""
    text = f"""# Run report: {cfg.name}

Task: `{cfg.model.task}` on `{cfg.model.name_or_path}`, {cfg.quantization.bits}-bit base
({cfg.quantization.quant_type}, double quant {cfg.quantization.double_quant}), LoRA r={cfg.lora.r}
alpha={cfg.lora.alpha}, {cfg.scaling.num_workers} Ray Train worker(s), {"GPU" if cfg.scaling.use_gpu else "CPU"}.

| | |
|---|---|
| optimizer steps | {summary['steps']} |
| epochs | {summary['epochs']} |
| train loss (first → last step) | {summary['first_loss']:.4f} → {summary['final_loss']:.4f} ({summary['loss_drop']:.1%} lower) |
| median tokens/s (all workers, non-pad) | {summary['median_tokens_per_s']:.0f} |
| peak memory per worker (MB) | {summary['peak_memory_mb']:.0f} |

## Final validation

| metric | value |
|---|---|
{rows}

{figures}
{sections}{tracked}
## Config

```yaml
{dump_config(cfg)}```
"""
    atomic_write_text(run_dir / "report.md", text)


SCORE_NAMES = {"exact_match": "exact match", "token_f1": "token F1", "rouge_l": "ROUGE-L",
               "entity_precision": "entity precision", "entity_recall": "entity recall", "entity_f1": "entity F1",
               "token_weighted_f1": "token-level weighted F1"}


def before_after_sentence(r: dict[str, Any]) -> str:
    """The headline of a before/after scoring in one sentence (model card, pipeline report)."""
    key = r["metric"]
    return (f"Validation {key.replace('_', ' ')} on {r['examples']} held-out examples: base {r['base'][key]:.3f}, "
            f"fine-tuned {r['finetuned'][key]:.3f} ({r['gain']:+.3f})")


def before_after_section(r: dict[str, Any] | None) -> str:
    """The base and the fine-tuned model side by side on the same validation rows (Markdown)."""
    if not r:
        return ""
    what = "sentences" if "entity_f1" in r["base"] else "questions"
    rows = [f"| {label} | {r['base'][k]:.3f} | {r['finetuned'][k]:.3f} | {r['finetuned'][k] - r['base'][k]:+.3f} |"
            for k, label in SCORE_NAMES.items() if k in r["base"]]
    text = (f"\n## Before and after fine-tuning\n\nThe base alone and the base with this run's adapter, on the same "
            f"{r['examples']} validation {what}:\n\n| metric | base | fine-tuned | change |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    samples = list(zip(r["base"].get("samples", []), r["finetuned"].get("samples", []), strict=False))[:3]
    for b, f in samples:
        text += (f"\n- **Q:** {b['question']}\n  - reference: {b['reference'][:200]}\n  - base: {b['generated'][:200]}"
                 f"\n  - fine-tuned: {f['generated'][:200]}")
    return text + ("\n" if samples else "")


def cost_section(cost: dict[str, Any] | None) -> str:
    """Wall time by stage, resource-hours, throughput per resource-hour, MFU and dollars (Markdown)."""
    if not cost:
        return ""
    from orchestrator.reports.cost import cost_lines

    return "\n## Cost\n\n| | |\n|---|---|\n" + "\n".join(cost_lines(cost)) + "\n"


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return (s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2) if n else 0.0
