"""Question/answer pairs from segmented articles.

Three sources, picked by ``data.qa.kind``:

* ``rules`` (default): a deterministic generator that needs no network. Questions come from article
  numbers and titles, clauses, sub-clauses and offices ("The President shall be the head of state..." ->
  "Who is the head of state...?"); answers are the text itself.
* ``llm``: any OpenAI-compatible chat endpoint writes the pairs, with retries and backoff, a request-rate
  limit, JSON validation, and an on-disk cache so a re-run never pays for the same request twice.
* ``jsonl``: the user's own pairs, one ``{"question": ..., "answer": ...}`` object per line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from orchestrator.core.io import atomic_write_text, text_lines

log = logging.getLogger(__name__)

DOC_NAME = "the Constitution of Nepal"
_MAX_ANSWER_CHARS = 1200
# "The President shall be the head of state of Nepal." -> "Who is the head of state of Nepal?"
_OFFICE = re.compile(r"^(?:The|There shall be an?) [A-Z][\w-]*(?: (?:[A-Z][\w-]*|of|and|the))* shall be (the [^.;:,]+?)\.")


def _clip(text: str, limit: int = _MAX_ANSWER_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    stop = max(cut.rfind(". "), cut.rfind("; "))
    return (cut[: stop + 1] if stop > limit // 2 else cut).strip()


def _sentence(text: str) -> str:
    text = text.strip().rstrip(",;-").strip()
    if text and text[-1] not in ".:?!":
        text += "."
    return text[0].upper() + text[1:] if text else text


def rule_based_pairs(article: dict[str, Any], doc: str = DOC_NAME) -> list[dict[str, str]]:
    """Deterministic pairs for one article row (see :class:`orchestrator.data.documents.Article`)."""
    n, title, text = article["number"], article["title"], article["text"]
    part = article.get("part_title")
    src = {"article": n, "title": title}
    pairs = []
    where = f"Article {n} ({title})" + (f", in Part {article['part_number']} ({part})" if part else "")
    pairs.append({"question": f"Which article of {doc} deals with {title.lower()}?",
                  "answer": f"{where}.", **src})
    if text:
        pairs.append({"question": f"What does Article {n} of {doc} provide about {title.lower()}?",
                      "answer": _clip(text), **src})
        pairs.append({"question": f"What does Article {n} of {doc} provide?", "answer": _clip(text), **src})
    for clause in article.get("clauses") or []:
        c = clause["number"]
        ctext = clause["text"]
        if not ctext:
            continue
        pairs.append({"question": f"What does clause ({c}) of Article {n} ({title}) of {doc} say?",
                      "answer": _sentence(_clip(ctext)), **src})
        if office := _OFFICE.match(ctext):
            pairs.append({"question": f"Who is {office.group(1)}?", "answer": _sentence(_clip(ctext)), **src})
        for letter, stext in clause.get("subclauses") or []:
            if stext:
                pairs.append({
                    "question": f"What is sub-clause ({letter}) of clause ({c}) of Article {n} ({title}) of {doc}?",
                    "answer": _sentence(_clip(stext)), **src,
                })
    return pairs


def read_qa_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Read user QA pairs; each line must be an object with non-empty string question and answer."""
    rows = []
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        for key in ("question", "answer"):
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str) or not obj[key].strip():
                raise ValueError(f"{path}:{lineno}: field {key!r} must be a non-empty string")
        rows.append({"question": obj["question"].strip(), "answer": obj["answer"].strip()})
    if not rows:
        raise ValueError(f"{path}: no QA pairs found")
    return rows


class RateLimiter:
    """A simple thread-safe minimum interval between requests."""

    def __init__(self, per_second: float):
        self.interval = 1.0 / per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self.interval
        if delay > 0:
            time.sleep(delay)


class LLMQAGenerator:
    """Ask an OpenAI-compatible chat endpoint for QA pairs about one article at a time."""

    PROMPT = (
        "You write training data for a question-answering assistant about {doc}.\n"
        "Write {k} distinct question/answer pairs about the article below. Answers must be faithful to "
        "the text and self-contained. Reply with JSON only: "
        '{{"pairs": [{{"question": "...", "answer": "..."}}]}}\n\n'
        "Article {number}: {title}\n{text}"
    )

    def __init__(self, base_url: str, model: str, api_key: str | None, cache_dir: str | Path,
                 questions_per_article: int = 3, max_retries: int = 5, requests_per_second: float = 2.0,
                 timeout_s: float = 60.0, doc: str = DOC_NAME, transport: httpx.BaseTransport | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.k, self.doc = model, questions_per_article, doc
        self.max_retries = max_retries
        self.limiter = RateLimiter(requests_per_second)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers, transport=transport)
        self.requests_made = 0
        self.cache_hits = 0

    @classmethod
    def from_config(cls, qa_cfg, cache_dir: Path) -> LLMQAGenerator:
        return cls(qa_cfg.base_url, qa_cfg.model, os.environ.get(qa_cfg.api_key_env), cache_dir,
                   qa_cfg.questions_per_article, qa_cfg.max_retries, qa_cfg.requests_per_second, qa_cfg.timeout_s)

    def _payload(self, article: dict[str, Any]) -> dict[str, Any]:
        prompt = self.PROMPT.format(doc=self.doc, k=self.k, number=article["number"], title=article["title"],
                                    text=_clip(article["text"], 6000))
        return {"model": self.model, "temperature": 0.0, "response_format": {"type": "json_object"},
                "messages": [{"role": "user", "content": prompt}]}

    @staticmethod
    def parse(content: str) -> list[dict[str, str]]:
        """Validate the model's reply: a JSON object with a non-empty ``pairs`` list of Q/A strings."""
        text = content.strip()
        if text.startswith("```"):
            text = text.strip("`").removeprefix("json").strip()
        obj = json.loads(text)
        pairs = obj.get("pairs") if isinstance(obj, dict) else obj
        if not isinstance(pairs, list) or not pairs:
            raise ValueError("reply has no 'pairs' list")
        out = []
        for p in pairs:
            if not (isinstance(p, dict) and isinstance(p.get("question"), str) and isinstance(p.get("answer"), str)
                    and p["question"].strip() and p["answer"].strip()):
                raise ValueError(f"bad pair in reply: {p!r}")
            out.append({"question": p["question"].strip(), "answer": p["answer"].strip()})
        return out

    def generate(self, article: dict[str, Any]) -> list[dict[str, str]]:
        payload = self._payload(article)
        key = hashlib.sha256(json.dumps([self.url, payload], sort_keys=True).encode()).hexdigest()
        cached = self.cache_dir / f"{key}.json"
        if cached.exists():
            self.cache_hits += 1
            pairs = json.loads(cached.read_text())
        else:
            pairs = self._request(payload, article["number"])
            atomic_write_text(cached, json.dumps(pairs))
        src = {"article": article["number"], "title": article["title"]}
        return [{**p, **src} for p in pairs]

    def _request(self, payload: dict[str, Any], number: int) -> list[dict[str, str]]:
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)) * (1 + random.random() * 0.25))
            self.limiter.wait()
            self.requests_made += 1
            try:
                resp = self.client.post(self.url, json=payload)
            except httpx.HTTPError as e:
                last = e
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = RuntimeError(f"HTTP {resp.status_code}")
                continue
            if resp.status_code >= 400:
                raise RuntimeError(f"QA endpoint {self.url} refused article {number}: HTTP {resp.status_code} "
                                   f"{resp.text[:200]}")
            try:
                return self.parse(resp.json()["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError) as e:
                last = e  # malformed JSON from the model: ask again
        raise RuntimeError(f"QA endpoint {self.url}: article {number} failed after "
                           f"{self.max_retries + 1} attempts: {last}")
