"""`orchestrator eval CONFIG --adapter DIR`: score an adapter on the test split.

NER: entity-level precision/recall/F1 per entity type (seqeval) and the token-level weighted F1.
QA: exact match, token F1 and ROUGE-L of greedy answers against the reference answers, plus examples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from orchestrator.artifacts.adapters import adapter_labels, load_adapter_model, open_adapter
from orchestrator.core.config import RunConfig
from orchestrator.core.io import atomic_write_text
from orchestrator.data.prepare import heldout_rows
from orchestrator.reports.scores import exact_match, rouge_l, token_f1


def generate_answers(model, tokenizer, cfg: RunConfig, questions: list[str], device, max_new_tokens: int = 128,
                     batch_size: int = 8) -> list[str]:
    from orchestrator.data.tokenization import format_prompt_answer

    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(questions), batch_size):
        prompts = [format_prompt_answer(tokenizer, q, None, cfg.data.chat_template, cfg.data.system_prompt)[0]
                   for q in questions[i:i + batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out += [tokenizer.decode(g[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for g in gen]
    return out


def evaluate_qa(cfg: RunConfig, adapter: Path, pairs: list[dict], limit: int | None = None) -> dict[str, Any]:
    from orchestrator.data.tokenization import load_tokenizer

    pairs = pairs[:limit] if limit else pairs
    model, device = load_adapter_model(cfg, adapter)
    tok = load_tokenizer(str(adapter))
    refs = [p["answer"] for p in pairs]
    # Room for the longest reference (so exact match is possible), within the training row length.
    longest = max((len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs), default=0)
    budget = max(16, min(longest + 8, cfg.data.max_seq_length))
    preds = generate_answers(model, tok, cfg, [p["question"] for p in pairs], device, max_new_tokens=budget)
    n = max(1, len(pairs))
    return {
        "examples": len(pairs),
        "exact_match": sum(map(exact_match, preds, refs)) / n,
        "token_f1": sum(map(token_f1, preds, refs)) / n,
        "rouge_l": sum(map(rouge_l, preds, refs)) / n,
        "samples": [{"question": p["question"], "reference": r, "generated": g}
                    for p, r, g in list(zip(pairs, refs, preds, strict=True))[:8]],
    }


def evaluate_ner(cfg: RunConfig, adapter: Path, sentences: list[dict], labels: list[str]) -> dict[str, Any]:
    from orchestrator.data.tokenization import IGNORE, encode_ner, load_tokenizer, pad_batch
    from orchestrator.reports.scores import ner_metrics

    model, device = load_adapter_model(cfg, adapter, labels)
    tok = load_tokenizer(str(adapter))
    l2i = {lab: i for i, lab in enumerate(labels)}
    true, pred = [], []
    bs = 32
    for i in range(0, len(sentences), bs):
        chunk = sentences[i:i + bs]
        enc = [encode_ner(tok, s["tokens"], s["tags"], l2i, cfg.data.max_seq_length) for s in chunk]
        batch = pad_batch({"input_ids": [e["input_ids"] for e in enc], "labels": [e["labels"] for e in enc]},
                          tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(batch["input_ids"], device=device),
                           attention_mask=torch.as_tensor(batch["attention_mask"], device=device)).logits
        p = logits.argmax(-1).cpu().numpy()
        for row_p, row_g in zip(p, batch["labels"], strict=True):
            keep = row_g != IGNORE
            true.append([labels[x] for x in row_g[keep]])
            pred.append([labels[x] for x in row_p[keep]])
    return {"examples": len(sentences), **ner_metrics(true, pred, per_type=True)}


def run_eval(config: str | Path, adapter: str | Path, overrides: list[str] | None = None,
             limit: int | None = None) -> dict[str, Any]:
    """Evaluate ``adapter`` on the config's test split; write eval.json next to the adapter."""
    cfg, adapter = open_adapter(config, adapter, overrides)  # the base built or checked before Ray starts
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
