"""How answers and entity tags are scored: exact match, token F1 and ROUGE-L for QA; entity-level P/R/F1
(seqeval, strict spans) and token-level weighted F1 for NER. Training's validation, `orchestrator eval` and
the reports all score with these."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure on whitespace tokens of the normalized texts (longest common subsequence)."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r, 1):
            cur.append(prev[j - 1] + 1 if a == b else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def ner_metrics(true: list[list[str]], pred: list[list[str]], per_type: bool = False) -> dict[str, Any]:
    """Entity-level precision/recall/F1 (seqeval, strict spans) and the token-level weighted F1
    over non-O-and-O tags (the seeds' figure), labelled as such."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    out: dict[str, Any] = {
        "entity_precision": float(precision_score(true, pred, zero_division=0)),
        "entity_recall": float(recall_score(true, pred, zero_division=0)),
        "entity_f1": float(f1_score(true, pred, zero_division=0)),
        "token_weighted_f1": token_weighted_f1([t for s in true for t in s], [t for s in pred for t in s]),
    }
    if per_type:
        rep = classification_report(true, pred, output_dict=True, zero_division=0)
        out["per_type"] = {k: {m: float(v[m]) for m in ("precision", "recall", "f1-score", "support")}
                           for k, v in rep.items() if isinstance(v, dict)}
    return out


def token_weighted_f1(true: list[str], pred: list[str]) -> float:
    """Support-weighted mean of per-tag F1 over tokens (all tags, O included)."""
    if not true:
        return 0.0
    support = Counter(true)
    tp = Counter(t for t, p in zip(true, pred, strict=True) if t == p)
    pred_count = Counter(pred)
    total = 0.0
    for tag, n in support.items():
        prec = tp[tag] / pred_count[tag] if pred_count[tag] else 0.0
        rec = tp[tag] / n
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        total += f1 * n
    return total / len(true)
