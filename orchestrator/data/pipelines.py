"""Ray Data pipelines for both corpora, ending as tokenized Ray Datasets that Ray Train workers stream.

Constitution (causal_lm): PDF pages are extracted in parallel Ray tasks, grouped per document and
segmented into Articles (:mod:`orchestrator.data.documents`), turned into QA pairs (:mod:`orchestrator.data.qa`),
tokenized by an actor pool with prompt masking, then packed (or left for dynamic padding).

Medical NER (token_classification): CoNLL/BIO or JSON files are validated on the driver (so a bad
line fails fast with its file and line), split, and tokenized by an actor pool with word/sub-word
label alignment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.core.config import RunConfig
from orchestrator.core.io import atomic_dir, atomic_write_text
from orchestrator.data import ner
from orchestrator.data.documents import clean_page, extract_pages, pdf_page_count, segment
from orchestrator.data.qa import LLMQAGenerator, read_qa_jsonl, rule_based_pairs
from orchestrator.data.splits import cap_splits, split_for
from orchestrator.data.tokenization import IGNORE, encode_ner, encode_qa, load_tokenizer, pack, pad_batch

log = logging.getLogger(__name__)

PAGES_PER_TASK = 16
PACK_WINDOW = 512  # examples packed together (tokenization.fill_rows within a window)


@dataclass
class Prepared:
    """Tokenized splits as Ray Datasets plus what was counted on the way."""

    datasets: dict[str, Any]
    raw: dict[str, list[dict]]
    labels: list[str] | None = None
    documents: int = 0
    units: int = 0  # articles (pdf) or sentences (NER)
    notes: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- constitution: PDF -> articles

def _extract_batch(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """Ray task: extract and clean a run of pages of one PDF."""
    paths, pages, texts = [], [], []
    for path, start, count in zip(batch["path"], batch["start"], batch["count"], strict=True):
        for k, text in enumerate(extract_pages(path, list(range(int(start), int(start) + int(count))))):
            paths.append(path)
            pages.append(int(start) + k)
            texts.append("\n".join(clean_page(text)))
    return {"path": paths, "page": pages, "text": texts}


def _segment_group(group) -> dict[str, list]:
    """Ray map_groups: all pages of one document, in page order, into article rows."""
    order = np.argsort(group["page"])
    pages = [(int(group["page"][i]), group["text"][i].split("\n")) for i in order]
    rows = [a.to_row() for a in segment(pages)]
    path = str(group["path"][0])
    return {"document": [path] * len(rows), "article": [json.dumps(r) for r in rows]}


def article_cache_dir() -> Path:
    """Where segmented documents are cached: $ORCHESTRATOR_CACHE_DIR, else ~/.cache/orchestrator."""
    root = os.environ.get("ORCHESTRATOR_CACHE_DIR") or Path.home() / ".cache" / "orchestrator"
    return Path(root) / "articles"


def _cache_key(pdf: Path) -> str:
    """The PDF's bytes plus the extraction code (and pypdf's version): a change to either misses."""
    import pypdf

    from orchestrator.data import documents

    h = hashlib.sha256(Path(pdf).read_bytes())
    h.update(Path(documents.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(pypdf.__version__.encode())
    return h.hexdigest()[:32]


def read_articles(pdf_paths: list[str], cache: bool = True) -> list[dict]:
    """Segment PDFs into article rows with Ray Data (pages extracted in parallel).

    With ``cache``, a document segmented before (same bytes, same code) is read back from
    :func:`article_cache_dir` instead: train, tune trials, merge and eval of one corpus share it.
    """
    import ray

    for p in pdf_paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"data.train: {p}: no such file")
    cached: dict[str, list[dict]] = {}
    keys = {str(p): _cache_key(Path(p)) for p in pdf_paths} if cache else {}
    for p, key in keys.items():
        f = article_cache_dir() / f"{key}.json"
        if f.is_file():
            cached[p] = [r | {"document": p} for r in json.loads(f.read_text())]
            log.info("%s: %d articles from the cache (%s)", p, len(cached[p]), f)
    todo = [str(p) for p in pdf_paths if str(p) not in cached]
    rows = [r for rs in cached.values() for r in rs]
    if todo:
        items = []
        for p in todo:
            n = pdf_page_count(p)
            items += [{"path": p, "start": s, "count": min(PAGES_PER_TASK, n - s)} for s in range(0, n, PAGES_PER_TASK)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        pages = ds.map_batches(_extract_batch, batch_size=1, batch_format="numpy")
        arts = pages.groupby("path").map_groups(_segment_group, batch_format="numpy")
        new = [json.loads(r["article"]) | {"document": r["document"]} for r in arts.take_all()]
        for p in todo:
            mine = sorted((r for r in new if r["document"] == p), key=lambda r: r["number"])
            if not mine:
                raise ValueError(f"{p}: no articles found (expected headings like '1. Title: text' after a 'Part-1' line)")
            if cache:
                body = json.dumps([{k: v for k, v in r.items() if k != "document"} for r in mine])
                atomic_write_text(article_cache_dir() / f"{keys[p]}.json", body)
        rows += new
    rows.sort(key=lambda r: (r["document"], r["number"]))
    return rows


def qa_pairs(cfg: RunConfig, articles: list[dict]) -> list[dict]:
    qa = cfg.data.qa
    if qa.max_articles:
        articles = articles[: qa.max_articles]
    if qa.kind == "rules":
        return [p for a in articles for p in rule_based_pairs(a)]
    gen = LLMQAGenerator.from_config(qa, Path(qa.cache_dir))
    pairs = [p for a in articles for p in gen.generate(a)]
    log.info("LLM QA: %d requests, %d cache hits", gen.requests_made, gen.cache_hits)
    return pairs


def causal_lm_rows(cfg: RunConfig) -> tuple[dict[str, list[dict]], int, int]:
    """QA pairs per split, the number of documents, and the number of articles."""
    d = cfg.data
    if d.format == "qa_jsonl":
        splits = {"train": [r for p in d.train for r in read_qa_jsonl(p)]}
        if d.validation or d.test:
            splits["validation"] = [r for p in d.validation for r in read_qa_jsonl(p)]
            splits["test"] = [r for p in d.test for r in read_qa_jsonl(p)]
        else:
            splits = split_for(cfg, splits["train"])
        return cap_splits(cfg, splits), len(d.train), 0
    if d.qa.kind == "jsonl":
        splits = split_for(cfg, read_qa_jsonl(d.qa.jsonl_path))
        return cap_splits(cfg, splits), len(d.train), 0
    articles = read_articles(d.train)
    return cap_splits(cfg, split_for(cfg, qa_pairs(cfg, articles))), len(d.train), len(articles)


def ner_rows(cfg: RunConfig) -> tuple[dict[str, list[dict]], list[str], ner.Repairs]:
    d = cfg.data
    for p in d.train + d.validation + d.test:
        if not Path(p).is_file():
            raise FileNotFoundError(f"data: {p}: no such file")
    train, repairs = ner.read_ner(d.train, d.format, d.repair)
    if d.validation or d.test:
        val = ner.read_ner(d.validation, d.format, d.repair)[0] if d.validation else []
        test = ner.read_ner(d.test, d.format, d.repair)[0] if d.test else []
        splits = {"train": train, "validation": val, "test": test}
    else:
        splits = split_for(cfg, train)
    labels = ner.label_list([s for rows in splits.values() for s in rows])
    return cap_splits(cfg, splits), labels, repairs


# ---------------------------------------------------------------- tokenization (actor pools)

class QATokenizer:
    """Ray Data actor: chat-format and tokenize QA pairs with prompt tokens masked to -100."""

    def __init__(self, model: str, max_len: int, template: str, system_prompt: str | None):
        self.tok = load_tokenizer(model)
        self.max_len, self.template, self.system = max_len, template, system_prompt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "num_tokens": [], "truncated": [], "dropped": []}
        for q, a in zip(batch["question"], batch["answer"], strict=True):
            enc = encode_qa(self.tok, str(q), str(a), self.max_len, self.template, self.system)
            if enc is None:  # prompt alone fills max_seq_length: nothing to learn
                out["input_ids"].append(np.zeros(0, np.int64))
                out["labels"].append(np.zeros(0, np.int64))
                out["num_tokens"].append(0)
                out["truncated"].append(True)
                out["dropped"].append(True)
                continue
            out["input_ids"].append(np.asarray(enc["input_ids"], np.int64))
            out["labels"].append(np.asarray(enc["labels"], np.int64))
            out["num_tokens"].append(len(enc["input_ids"]))
            out["truncated"].append(enc["truncated"])
            out["dropped"].append(False)
        return out


class NERTokenizer:
    """Ray Data actor: sub-word tokenize sentences and align BIO labels."""

    def __init__(self, model: str, max_len: int, labels: list[str], label_all_subtokens: bool):
        self.tok = load_tokenizer(model)
        self.max_len, self.all_sub = max_len, label_all_subtokens
        self.label2id = {lab: i for i, lab in enumerate(labels)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "num_tokens": [], "truncated": [], "dropped": []}
        for tokens, tags in zip(batch["tokens"], batch["tags"], strict=True):
            enc = encode_ner(self.tok, list(tokens), list(tags), self.label2id, self.max_len, self.all_sub)
            out["input_ids"].append(np.asarray(enc["input_ids"], np.int64))
            out["labels"].append(np.asarray(enc["labels"], np.int64))
            out["num_tokens"].append(len(enc["input_ids"]))
            out["truncated"].append(enc["truncated"])
            out["dropped"].append(False)
        return out


def _drop_and_pack(max_len: int, pad_id: int, packing: bool):
    def fn(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        keep = [i for i, d in enumerate(batch["dropped"]) if not d]
        n_dropped = len(batch["dropped"]) - len(keep)
        if not packing:
            out = {k: [batch[k][i] for i in keep] for k in ("input_ids", "labels", "num_tokens", "truncated")}
            out["dropped_before"] = [0] * len(keep)
            if keep:
                out["dropped_before"][0] = n_dropped  # dropped examples are counted on a surviving row
            return out
        examples = [{"input_ids": list(batch["input_ids"][i]), "labels": list(batch["labels"][i]),
                     "truncated": bool(batch["truncated"][i])} for i in keep]
        rows = pack(examples, max_len, pad_id)
        out = {k: np.stack([r[k] for r in rows]) if rows else np.zeros((0, max_len), np.int64)
               for k in ("input_ids", "labels", "position_ids", "seq_ids")}
        for k in ("num_tokens", "num_examples", "truncated"):
            out[k] = np.array([r[k] for r in rows], np.int64)
        out["dropped_before"] = np.zeros(len(rows), np.int64)
        if rows:
            out["dropped_before"][0] = n_dropped
        return out
    return fn


def tokenize_dataset(cfg: RunConfig, rows: list[dict], labels: list[str] | None = None, actors: int | None = None):
    """A lazy Ray Dataset of model-ready rows for one split (packed for causal LM when configured)."""
    import ray

    d = cfg.data
    actors = actors or d.tokenize_actors
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 64, 64)) or 1)
    if cfg.model.task == "causal_lm":
        ds = ds.map_batches(QATokenizer, batch_size=d.tokenize_batch_size, batch_format="numpy",
                            fn_constructor_kwargs={"model": cfg.model.name_or_path, "max_len": d.max_seq_length,
                                                   "template": d.chat_template, "system_prompt": d.system_prompt},
                            compute=ray.data.ActorPoolStrategy(size=actors))
        pad_id = load_tokenizer(cfg.model.name_or_path).pad_token_id
        return ds.map_batches(_drop_and_pack(d.max_seq_length, pad_id, d.packing), batch_size=PACK_WINDOW,
                              batch_format="numpy")
    return ds.map_batches(NERTokenizer, batch_size=d.tokenize_batch_size, batch_format="numpy",
                          fn_constructor_kwargs={"model": cfg.model.name_or_path, "max_len": d.max_seq_length,
                                                 "labels": labels, "label_all_subtokens": d.label_all_subtokens},
                          compute=ray.data.ActorPoolStrategy(size=actors))


def prepare(cfg: RunConfig) -> Prepared:
    """Run the data pipeline for a config: raw rows per split and lazy tokenized Ray Datasets."""
    if cfg.model.task == "causal_lm":
        raw, docs, units = causal_lm_rows(cfg)
        labels, notes = None, {}
    else:
        raw, labels, repairs = ner_rows(cfg)
        docs = len(cfg.data.train) + len(cfg.data.validation) + len(cfg.data.test)
        units = sum(len(v) for v in raw.values())
        notes = {"repairs": {"i_without_b": repairs.i_without_b, "empty_sentences": repairs.empty_sentences}}
    datasets = {s: tokenize_dataset(cfg, rows, labels) for s, rows in raw.items() if rows}
    return Prepared(datasets=datasets, raw=raw, labels=labels, documents=docs, units=units, notes=notes)


# ---------------------------------------------------------------- stats, collation, parquet

def split_stats(cfg: RunConfig, ds) -> dict[str, Any]:
    """Counts for one tokenized split: examples, rows, real tokens, truncated, padding efficiency."""
    L = cfg.data.max_seq_length
    cols = ds.columns()
    want = [c for c in ("num_tokens", "num_examples", "truncated", "dropped_before") if c in cols]
    batches = list(ds.select_columns(want).iter_batches(batch_size=4096, batch_format="numpy"))
    ntok = np.concatenate([b["num_tokens"] for b in batches]) if batches else np.zeros(0, np.int64)
    stats: dict[str, Any] = {"rows": int(len(ntok)), "tokens": int(ntok.sum()),
                             "truncated": int(sum(b["truncated"].sum() for b in batches))}
    if "dropped_before" in cols:
        stats["dropped"] = int(sum(b["dropped_before"].sum() for b in batches))
    if "num_examples" in cols:  # packed
        stats["examples"] = int(sum(b["num_examples"].sum() for b in batches))
        stats["slots"] = stats["rows"] * L
    else:  # dynamic padding at the training micro-batch size, in stream order
        stats["examples"] = stats["rows"]
        mb = cfg.train.micro_batch_size
        stats["slots"] = int(sum(len(ntok[i:i + mb]) * ntok[i:i + mb].max() for i in range(0, len(ntok), mb)))
    stats["padding_efficiency"] = round(stats["tokens"] / stats["slots"], 4) if stats["slots"] else 0.0
    return stats


def make_collate(pad_id: int, packed: bool, multiple_of: int | None = None):
    """Collate for ``iter_torch_batches``: packed rows pass through (no attention_mask, so the model
    builds the per-example block mask from position_ids); variable rows are padded per batch."""
    import torch

    def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if packed:
            return {k: torch.as_tensor(np.asarray(batch[k])) for k in ("input_ids", "labels", "position_ids", "num_tokens")}
        out = pad_batch({"input_ids": list(batch["input_ids"]), "labels": list(batch["labels"])}, pad_id, multiple_of)
        return {k: torch.as_tensor(v) for k, v in out.items()}

    return collate


def micro_batches(shard, micro: int, collate, seed: int, device, group_by_length: bool = False,
                  window: int = 32):
    """One epoch of a shard's training micro-batches, shuffled through a local buffer (seeded per epoch).

    With ``group_by_length`` (unpacked rows: NER, unpacked QA) rows of similar length share a micro-batch, so
    little of a batch is padding: every ``window`` micro-batches' worth of rows is sorted by length and cut,
    and those micro-batches are served in a seeded random order. Same rows, same number of micro-batches."""
    import random

    import torch

    buffer = max(256, 4 * micro)
    if not group_by_length:
        yield from shard.iter_torch_batches(batch_size=micro, collate_fn=collate, device=device,
                                            local_shuffle_buffer_size=buffer, local_shuffle_seed=seed)
        return
    rng = random.Random(seed)
    for big in shard.iter_batches(batch_size=micro * window, batch_format="numpy",
                                  local_shuffle_buffer_size=max(buffer, micro * window), local_shuffle_seed=seed):
        order = sorted(range(len(big["input_ids"])), key=lambda i: len(big["input_ids"][i]))
        chunks = [order[i: i + micro] for i in range(0, len(order), micro)]
        rng.shuffle(chunks)
        for chunk in chunks:
            batch = collate({k: [v[i] for i in chunk] for k, v in big.items()})
            yield {k: t.to(device) if isinstance(t, torch.Tensor) else t for k, t in batch.items()}


def write_parquet(prepared: Prepared, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write every tokenized split to Parquet under ``out_dir`` atomically (all or nothing)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for split, ds in prepared.datasets.items():
            ds.write_parquet(str(tmp / split))
        atomic_write_text(tmp / "meta.json", json.dumps(
            {**meta, "labels": prepared.labels, "splits": list(prepared.datasets)}, indent=2))
        atomic_write_text(tmp / "raw.json", json.dumps(prepared.raw))
    return out_dir


def read_parquet(out_dir: str | Path) -> Prepared:
    """Re-read what :func:`write_parquet` wrote."""
    import ray

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "meta.json").read_text())
    raw = json.loads((out_dir / "raw.json").read_text())
    datasets = {s: ray.data.read_parquet(str(out_dir / s)) for s in meta["splits"]}
    return Prepared(datasets=datasets, raw=raw, labels=meta.get("labels"), documents=meta.get("documents", 0),
                    units=meta.get("units", 0), notes={**meta.get("notes", {}), "meta": meta})


__all__ = ["IGNORE", "Prepared", "prepare", "split_stats", "make_collate", "write_parquet", "read_parquet"]
