"""Scoring a model on held-out rows: greedy answers for QA (exact match, token F1, ROUGE-L), entity-level
P/R/F1 for NER; and the before/after pair every training run reports (the base alone, then the same base with
the trained adapter applied, on the same validation rows), run as a Ray task on one worker's resources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.core.config import RunConfig
from orchestrator.reports.scores import exact_match, ner_metrics, rouge_l, token_f1

HEADLINE = {"causal_lm": "token_f1", "token_classification": "entity_f1"}  # the one figure a summary shows


def generate_answers(model, tokenizer, cfg: RunConfig, questions: list[str], device, max_new_tokens: int = 128,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers to ``questions`` in the run's chat format."""
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


def score_qa(model, tokenizer, cfg: RunConfig, pairs: list[dict], device) -> dict[str, Any]:
    """Exact match, token F1 and ROUGE-L of greedy answers to ``pairs`` (and the first 8 as samples)."""
    refs = [p["answer"] for p in pairs]
    # room for the longest reference (so exact match is possible), within the training row length
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs), default=0)
    budget = max(16, min(longest + 8, cfg.data.max_seq_length))
    preds = generate_answers(model, tokenizer, cfg, [p["question"] for p in pairs], device, max_new_tokens=budget)
    n = max(1, len(pairs))
    return {
        "examples": len(pairs),
        "exact_match": sum(map(exact_match, preds, refs)) / n,
        "token_f1": sum(map(token_f1, preds, refs)) / n,
        "rouge_l": sum(map(rouge_l, preds, refs)) / n,
        "samples": [{"question": p["question"], "reference": r, "generated": g}
                    for p, r, g in list(zip(pairs, refs, preds, strict=True))[:8]],
    }


def score_ner(model, tokenizer, cfg: RunConfig, sentences: list[dict], labels: list[str], device) -> dict[str, Any]:
    """Entity-level P/R/F1 per type and overall, and token-level weighted F1, of ``sentences``.

    Tags the model was not trained on (another corpus's entity types) stay in the gold sequences: it cannot
    predict them, so they count as misses (listed in ``unseen_tags``, at recall 0 in the per-type table)."""
    from orchestrator.data.tokenization import IGNORE, encode_ner, pad_batch

    unseen = sorted({t for s in sentences for t in s["tags"]} - set(labels))
    labels = labels + unseen
    l2i = {lab: i for i, lab in enumerate(labels)}
    true, pred = [], []
    for i in range(0, len(sentences), 32):
        enc = [encode_ner(tokenizer, s["tokens"], s["tags"], l2i, cfg.data.max_seq_length)
               for s in sentences[i:i + 32]]
        batch = pad_batch({"input_ids": [e["input_ids"] for e in enc], "labels": [e["labels"] for e in enc]},
                          tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(batch["input_ids"], device=device),
                           attention_mask=torch.as_tensor(batch["attention_mask"], device=device)).logits
        for row_p, row_g in zip(logits.argmax(-1).cpu().numpy(), batch["labels"], strict=True):
            keep = row_g != IGNORE
            true.append([labels[x] for x in row_g[keep]])
            pred.append([labels[x] for x in row_p[keep]])
    return {"examples": len(sentences), "unseen_tags": unseen, **ner_metrics(true, pred, per_type=True)}


def score(model, tokenizer, cfg: RunConfig, rows: list[dict], labels: list[str] | None, device) -> dict[str, Any]:
    """The task's scores of ``model`` on ``rows``."""
    if cfg.model.task == "token_classification":
        return score_ner(model, tokenizer, cfg, rows, labels or [], device)
    return score_qa(model, tokenizer, cfg, rows, device)


def before_after(cfg: RunConfig, adapter: str | Path, rows: list[dict], labels: list[str] | None) -> dict[str, Any]:
    """The base alone, then the base with ``adapter`` applied, scored on the same ``rows``.

    NER: the base has no trained classifier (its head is the one a fine-tune starts from, seeded), so its
    scores are what the run starts from."""
    import time

    from peft import PeftModel

    from orchestrator.data.tokenization import load_tokenizer
    from orchestrator.training.model import load_base

    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)  # the base's new NER head: the one training starts from
    model = load_base(cfg, device, labels).eval()
    tokenizer = load_tokenizer(str(adapter))
    base = score(model, tokenizer, cfg, rows, labels, device)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    tuned = score(model, tokenizer, cfg, rows, labels, device)
    key = HEADLINE[cfg.model.task]
    return {"split": "validation", "examples": len(rows), "metric": key, "base": base, "finetuned": tuned,
            "gain": tuned[key] - base[key], "seconds": round(time.perf_counter() - t0, 1)}


def before_after_on_cluster(cfg: RunConfig, adapter: str | Path, rows: list[dict],
                            labels: list[str] | None) -> dict[str, Any]:
    """:func:`before_after` as a Ray task with one training worker's resources (a GPU where the run had them),
    so the driver needs no accelerator; the adapter folder must be readable there (the run's storage)."""
    import ray

    s = cfg.scaling
    # scheduled on its own, outside a Tune trial's placement group (the trial's workers have finished)
    task = ray.remote(num_cpus=s.cpus_per_worker, num_gpus=min(s.gpus_per_worker, 1) if s.use_gpu else 0,
                      max_retries=0, scheduling_strategy="DEFAULT")(_before_after_task)
    return ray.get(task.remote(cfg.model_dump(mode="json"), str(adapter), rows, labels))


def _before_after_task(run: dict[str, Any], adapter: str, rows: list[dict], labels: list[str] | None):
    return before_after(RunConfig.model_validate(run), adapter, rows, labels)
