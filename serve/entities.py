"""The entity-extraction deployment: a token-classification model, batched; BIO tags -> character spans."""

from __future__ import annotations

from typing import Any

from ray import serve

from serve.generator import MAX_BATCHES_IN_FLIGHT, Coalescer, serving_device
from serve.schemas import ModelSpec


class EntityExtractor:
    """A token-classification replica: batched tagging, BIO -> character spans with scores."""

    def __init__(self, spec: dict[str, Any]):
        import torch
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        self.spec = ModelSpec.model_validate(spec)
        self.device = serving_device()
        self.tokenizer = AutoTokenizer.from_pretrained(self.spec.path)
        self.model = AutoModelForTokenClassification.from_pretrained(self.spec.path).to(self.device).eval()
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.extract_batch.set_max_batch_size(self.spec.max_batch_size or 8)
        self.extract_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        self.coalescer = Coalescer(self._extract, self.spec.max_batch_size or 8)
        torch.set_grad_enabled(False)

    def stats(self, window_s: float | None = None) -> dict[str, Any]:
        return {"model": self.spec.name, "path": "token_classification", "max_batch_size": self.spec.max_batch_size}

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=MAX_BATCHES_IN_FLIGHT)
    async def extract_batch(self, texts: list[str]) -> list[list[dict[str, Any]]]:
        return await self.coalescer.submit(texts)

    def _extract(self, texts: list[str]) -> list[list[dict[str, Any]]]:
        import torch

        enc = self.tokenizer(texts, return_offsets_mapping=True, padding=True, truncation=True,
                             max_length=self.spec.max_input_length, return_tensors="pt")
        offsets = enc.pop("offset_mapping").tolist()
        probs = torch.softmax(self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float(), -1).cpu()
        out = []
        for b, text in enumerate(texts):
            words: dict[int, list[int]] = {}
            for t, w in enumerate(enc.word_ids(b)):
                if w is not None:
                    words.setdefault(w, []).append(t)
            spans: list[dict[str, Any]] = []
            cur = None
            for w in sorted(words):
                toks = words[w]
                p = probs[b, toks[0]]  # the label rides on the word's first sub-token, as in training
                label = self.id2label[int(p.argmax())]
                start, end = offsets[b][toks[0]][0], offsets[b][toks[-1]][1]
                kind = label[2:] if label[:2] in ("B-", "I-") else None
                if kind and cur and label.startswith("I-") and cur["type"] == kind:
                    cur["end"], cur["scores"] = end, cur["scores"] + [float(p.max())]
                    continue
                if cur:
                    spans.append(cur)
                cur = {"type": kind, "start": start, "end": end, "scores": [float(p.max())]} if kind else None
            if cur:
                spans.append(cur)
            out.append([{"type": s["type"], "start": s["start"], "end": s["end"], "text": text[s["start"]:s["end"]],
                         "score": round(sum(s["scores"]) / len(s["scores"]), 4)} for s in spans])
        return out

    async def extract(self, text: str) -> list[dict[str, Any]]:
        return await self.extract_batch(text)
