"""The pipeline's summary: one row per run (steps, loss, evaluation, time, tune best, merge fidelity) printed
and written as report.md, losses.png and summary.json in the pipeline's output folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.core.config import PipelineConfig, RunConfig
from orchestrator.core.io import atomic_write_bytes, atomic_write_text
from orchestrator.core.tracking import where_to_look
from orchestrator.reports.plots import draw_lines, figure_png, subplots
from orchestrator.reports.run import before_after_sentence
from orchestrator.reports.tables import markdown_table, text_table


@dataclass
class RunOutcome:
    cfg: RunConfig
    metrics: dict[str, Any] = field(default_factory=dict)
    train_s: float | None = None
    study: list[dict[str, Any]] = field(default_factory=list)
    best_trial: dict[str, Any] | None = None
    merge: dict[str, Any] | None = None
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)


def summary_table(outcomes: list[RunOutcome]) -> list[list[str]]:
    rows = [["run", "task", "steps", "train loss", "eval", "base val F1", "fine-tuned val F1", "train time", "cost",
             "tune best", "merge KL / top-1"]]
    for o in outcomes:
        m = o.metrics
        ev = ", ".join(f"{k} {v:.3g}" for k, v in m.get("final_eval", {}).items()
                       if k in ("val_loss", "perplexity", "entity_f1")) or "-"
        best = "-"
        if o.best_trial:
            metric = next(k for k in o.best_trial if k.startswith("best_"))
            best = f"{metric[5:]} {o.best_trial[metric]:.3g} ({len(o.study)} trials)"
        fid = "-"
        if o.merge:
            f = o.merge["fidelity"][o.merge["method"]]
            fid = f"{f['mean_kl']:.1e} / {f['top1_agreement']:.3f}"
        base, tuned = val_f1(m)
        rows.append([o.cfg.name, o.cfg.model.task, str(m.get("steps", "-")),
                     f"{m['first_loss']:.3g} -> {m['final_loss']:.3g}" if m else "-", ev,
                     f"{base:.3f}" if base is not None else "-", f"{tuned:.3f}" if tuned is not None else "-",
                     f"{o.train_s:.0f} s" if o.train_s else ("earlier" if m else "-"), cost_cell(m.get("cost")),
                     best, fid])
    return rows


def val_f1(metrics: dict[str, Any]) -> tuple[float | None, float | None]:
    """The run's base and fine-tuned F1 on validation (QA: token F1; NER: entity F1), where it was scored."""
    r = metrics.get("before_after")
    return (r["base"][r["metric"]], r["finetuned"][r["metric"]]) if r else (None, None)


def cost_cell(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    if "gpu_hours" in c:
        return f"{c['gpu_hours']:.3f} GPU-h" + (f" ${c['usd']:.2f}" if c.get("usd") is not None else "")
    return f"{c['cpu_core_hours']:.3f} core-h ${c['usd']:.3f}"


def run_figures(o: RunOutcome) -> dict[str, Any]:
    """A run's headline figures for summary.json: validation F1 before and after fine-tuning, and its cost."""
    base, tuned = val_f1(o.metrics)
    return {"base_val_f1": base, "finetuned_val_f1": tuned, "first_loss": o.metrics.get("first_loss"),
            "final_loss": o.metrics.get("final_loss"), "cost": o.metrics.get("cost")}


def _loss_plot(outcomes: list[RunOutcome]) -> bytes:
    fig, axes = subplots(len(outcomes), (5.5 * len(outcomes), 3.4))
    for ax, o in zip(axes, outcomes, strict=True):
        hist = o.metrics.get("history", [])
        draw_lines(ax, {"train loss": [(h["step"], h["loss"]) for h in hist],
                        "val loss": [(h["step"], h["val_loss"]) for h in hist if "val_loss" in h]},
                   o.cfg.name, "optimizer step", "loss")
    return figure_png(fig)


def write_report(pipe: PipelineConfig, report_dir: Path, outcomes: list[RunOutcome], url: str | None,
                 elapsed: str) -> str:
    """report.md + losses.png + summary.json in ``report_dir``; returns the printed summary table."""
    rows = summary_table(outcomes)
    md = [f"# Pipeline {pipe.name}", "", f"Stages: {', '.join(pipe.stages)}. Wall time: {elapsed}.", "",
          markdown_table(rows), ""]
    if any(o.metrics for o in outcomes):
        atomic_write_bytes(report_dir / "losses.png", _loss_plot([o for o in outcomes if o.metrics]))
        md += ["![training curves](losses.png)", ""]
    for o in outcomes:
        name = o.cfg.name
        md += [f"## {name}", "", f"Run report: [{name}/report.md]({name}/report.md)"]
        if r := o.metrics.get("before_after"):
            md += ["", before_after_sentence(r) + "."]
        if looks := where_to_look(o.cfg.run_dir):
            md += ["", "Tracking:", "", *[f"- `{line.split(':', 1)[0]}`: {line.split(':', 1)[1].strip()}"
                                          for line in looks]]
        if o.study:
            metric = next(k for k in o.study[0] if k.startswith("best_"))
            md += ["", f"Tune study ({name}-tune/trials.csv):", "",
                   markdown_table([["trial", metric, "status", "evals"]]
                             + [[t["trial_id"], f"{t[metric]:.4g}" if t[metric] is not None else "-", t["status"],
                                 str(t["evals"])] for t in o.study])]
        if o.evals:
            md += ["", "Greedy answers, scored against the reference clauses:", "",
                   markdown_table([["questions", "examples", "exact match", "token F1", "ROUGE-L"]]
                             + [[f"{split} split" + (" (trained on)" if split == "train" else " (held out)"),
                                 str(r["examples"]), f"{r['exact_match']:.3f}", f"{r['token_f1']:.3f}",
                                 f"{r['rouge_l']:.3f}"] for split, r in o.evals.items()])]
        if o.cfg.model.task == "token_classification" and "entity_f1" in o.metrics.get("final_eval", {}):
            fe = o.metrics["final_eval"]
            md += ["", f"Validation split (devel), last evaluation: entity precision {fe['entity_precision']:.3f}, "
                   f"recall {fe['entity_recall']:.3f}, **F1 {fe['entity_f1']:.3f}** (seqeval, strict spans)."]
        if o.merge:
            md += ["", f"Merged model: [{name}/merged]({name}/merged/README.md) ({o.merge['method']})"]
        for a in o.answers:
            if "question" in a:
                md += ["", f"**Q:** {a['question']}", "", f"**A:** {a['answer']}"]
            else:
                ents = ", ".join(f"`{e['text']}` ({e['type']})" for e in a["entities"]) or "none"
                md += ["", f"*{a['text']}* → {ents}"]
        md.append("")
    if url:
        md += [f"Served at {url} ({'still running' if pipe.keep_serving else 'shut down after the run'}).", ""]
    atomic_write_text(report_dir / "report.md", "\n".join(md))
    atomic_write_text(report_dir / "summary.json", json.dumps(
        {"name": pipe.name, "stages": pipe.stages, "wall": elapsed, "table": rows,
         "answers": {o.cfg.name: o.answers for o in outcomes},
         "evals": {o.cfg.name: {k: {m: v for m, v in r.items() if m != "samples"} for k, r in o.evals.items()}
                   for o in outcomes if o.evals},
         "tune_best": {o.cfg.name: o.best_trial for o in outcomes if o.best_trial},
         "runs": {o.cfg.name: run_figures(o) for o in outcomes if o.metrics}}, indent=2, default=str))
    return text_table(rows)


