"""`orchestrator eval CONFIG --adapter DIR`: score an adapter on the test split.

NER: entity-level precision/recall/F1 per entity type (seqeval) and the token-level weighted F1.
QA: exact match, token F1 and ROUGE-L of greedy answers against the reference answers, plus examples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.artifacts.adapters import adapter_labels, load_adapter_model, open_adapter
from orchestrator.core.config import RunConfig
from orchestrator.core.io import atomic_write_text
from orchestrator.core.runtime import quiet
from orchestrator.data.prepare import heldout_rows
from orchestrator.training.scoring import score_ner, score_qa


def evaluate_qa(cfg: RunConfig, adapter: Path, pairs: list[dict], limit: int | None = None) -> dict[str, Any]:
    """Greedy answers of the base with ``adapter`` applied, scored (EM / token F1 / ROUGE-L)."""
    from orchestrator.data.tokenization import load_tokenizer

    model, device = load_adapter_model(cfg, adapter)
    return score_qa(model, load_tokenizer(str(adapter)), cfg, pairs[:limit] if limit else pairs, device)


def evaluate_ner(cfg: RunConfig, adapter: Path, sentences: list[dict], labels: list[str]) -> dict[str, Any]:
    """Entity-level scores of the base with ``adapter`` applied; tags it never saw are scored as misses (said in
    one line)."""
    from orchestrator.data.tokenization import load_tokenizer

    model, device = load_adapter_model(cfg, adapter, labels)
    result = score_ner(model, load_tokenizer(str(adapter)), cfg, sentences, labels, device)
    if result["unseen_tags"]:
        print(f"note: the test data has tags the adapter was not trained on ({', '.join(result['unseen_tags'])}); "
              "they are scored as misses")
    return result


def run_eval(config: str | Path, adapter: str | Path, overrides: list[str] | None = None,
             limit: int | None = None) -> dict[str, Any]:
    """Evaluate ``adapter`` on the config's test split; write eval.json next to the adapter."""
    cfg, adapter = open_adapter(config, adapter, overrides)  # the base built or checked before Ray starts
    quiet(adapter.parent / "ray.log")  # the libraries' output to the run's log file (-v: here)
    rows = heldout_rows(cfg)
    rows = rows[:limit] if limit else rows
    if cfg.model.task == "token_classification":
        from orchestrator.data.pipelines import ner_rows

        labels = adapter_labels(adapter) or ner_rows(cfg)[1]
        result = evaluate_ner(cfg, adapter, rows, labels)
    else:
        result = evaluate_qa(cfg, adapter, rows)
    atomic_write_text(adapter.parent / "eval.json", json.dumps(result, indent=2))
    from orchestrator.reports.cards import fidelity_lines, write_card

    write_card(cfg, "adapter", adapter)  # the cards' model-index now holds the test results
    merged = adapter.parent / "merged"
    if (merged / "merge.json").is_file():
        write_card(cfg, "merged", merged, fidelity_lines(json.loads((merged / "merge.json").read_text())))
    from orchestrator.core.tracking import log_to_run

    log_to_run(adapter.parent, {k: v for k, v in result.items() if k != "samples"},
               [adapter.parent / "eval.json", adapter / "README.md"], job="eval")
    print(format_eval(cfg, result))
    return result


def format_eval(cfg: RunConfig, r: dict[str, Any]) -> str:
    if cfg.model.task == "token_classification":
        lines = [f"{cfg.name}: {r['examples']} test sentences",
                 f"{'entity type':<14}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}"]
        for k, v in r["per_type"].items():
            lines.append(f"{k:<14}{v['precision']:>10.3f}{v['recall']:>8.3f}{v['f1-score']:>8.3f}{v['support']:>9.0f}")
        lines.append(f"entity-level (seqeval) P/R/F1: {r['entity_precision']:.3f} / {r['entity_recall']:.3f} / "
                     f"{r['entity_f1']:.3f}; token-level weighted F1: {r['token_weighted_f1']:.3f}")
        return "\n".join(lines)
    lines = [f"{cfg.name}: {r['examples']} test questions — exact match {r['exact_match']:.3f}, "
             f"token F1 {r['token_f1']:.3f}, ROUGE-L {r['rouge_l']:.3f}"]
    for s in r["samples"][:3]:
        lines += [f"Q: {s['question']}", f"  reference: {s['reference'][:160]}", f"  generated: {s['generated'][:160]}"]
    return "\n".join(lines)
