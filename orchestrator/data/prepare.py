"""`orchestrator prepare CONFIG`: run a config's data pipeline and print what it produced; the tokenized splits
a run trains on (re-read from Parquet when written before), and the held-out rows later stages score on."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from orchestrator.core.config import RunConfig, load_config
from orchestrator.core.runtime import init_ray, quiet
from orchestrator.data.base import ensure_model
from orchestrator.data.pipelines import Prepared, prepare, read_parquet, split_stats, write_parquet


def prepare_data(cfg: RunConfig) -> Prepared:
    """Data for a run: re-read Parquet when ``data.parquet_dir`` already holds this config's splits,
    else run the pipeline (and write Parquet there once, atomically, when configured). The base model (whose
    tokenizer the pipeline uses) must be ready: the verbs run :func:`orchestrator.data.base.ensure_model` first."""
    key = data_key(cfg)
    pq = Path(cfg.data.parquet_dir) if cfg.data.parquet_dir else None
    if pq and (pq / "meta.json").exists() and json.loads((pq / "meta.json").read_text()).get("key") == key:
        return read_parquet(pq)
    prepared = prepare(cfg)
    if pq:
        write_parquet(prepared, pq, {"key": key, "documents": prepared.documents, "units": prepared.units,
                                     "notes": prepared.notes})
        prepared = read_parquet(pq)
    return prepared


def data_key(cfg: RunConfig) -> dict[str, Any]:
    """What the tokenized splits depend on: the data section and the tokenizer's model."""
    return {"data": cfg.data.model_dump(mode="json", exclude={"parquet_dir", "tokenize_actors"}),
            "model": cfg.model.name_or_path, "task": cfg.model.task}


def run_prepare(config: str | Path, overrides: list[str] | None = None, parquet_dir: str | None = None) -> dict[str, Any]:
    """Prepare a config's data with a progress bar and return (and print) the counts."""
    cfg = load_config(config, overrides)
    if parquet_dir:
        cfg.data.parquet_dir = str(Path(parquet_dir).resolve())
    t0 = time.perf_counter()
    quiet(cfg.run_dir / "ray.log")  # before the bar: native output moves to the log file with the console's
    steps = tqdm(total=3, desc="prepare", unit="stage")
    steps.set_postfix_str("base model / tokenizer")
    ensure_model(cfg)
    steps.update()
    init_ray(log_file=cfg.run_dir / "ray.log")
    steps.set_postfix_str("read, segment, tokenize")
    prepared = prepare_data(cfg)
    steps.update()
    steps.set_postfix_str("count")
    report: dict[str, Any] = {"config": str(config), "task": cfg.model.task, "documents": prepared.documents,
                              "units": prepared.units, "labels": prepared.labels, "splits": {}}
    for split, ds in prepared.datasets.items():
        report["splits"][split] = split_stats(cfg, ds.materialize())
    steps.update()
    steps.close()
    report["notes"] = prepared.notes.get("repairs", {})
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(format_report(cfg, report))
    return report


def heldout_rows(cfg: RunConfig, split: str | None = None) -> list[dict]:
    """Rows of ``split`` read without tokenizing (QA pairs or NER sentences); by default the test split, the
    validation split where there is none."""
    if cfg.model.task == "token_classification":
        from orchestrator.data.pipelines import ner_rows

        raw, _, _ = ner_rows(cfg)
    else:
        from orchestrator.data.pipelines import causal_lm_rows

        init_ray(log_file=cfg.run_dir / "ray.log")
        raw, _, _ = causal_lm_rows(cfg)
    if split:
        return raw.get(split) or []
    return raw.get("test") or raw.get("validation") or []


def format_report(cfg: RunConfig, r: dict[str, Any]) -> str:
    unit = "articles" if cfg.data.format == "pdf" else ("sentences" if cfg.model.task != "causal_lm" else "pairs")
    lines = [f"{cfg.name}: {r['documents']} documents, {r['units']} {unit}" +
             (f", {len(r['labels'])} labels" if r.get("labels") else "") + f" ({r['seconds']} s)",
             f"{'split':<11}{'examples':>9}{'rows':>8}{'tokens':>10}{'truncated':>10}{'dropped':>8}{'efficiency':>11}"]
    for split, s in r["splits"].items():
        lines.append(f"{split:<11}{s['examples']:>9}{s['rows']:>8}{s['tokens']:>10}{s['truncated']:>10}"
                     f"{s.get('dropped', 0):>8}{s['padding_efficiency']:>11.1%}")
    mode = "packed" if cfg.data.packing and cfg.model.task == "causal_lm" else f"padded per micro-batch of {cfg.train.micro_batch_size}"
    lines.append(f"efficiency = real tokens / slots ({mode}, max_seq_length {cfg.data.max_seq_length})")
    if r.get("notes") and any(r["notes"].values()):
        lines.append(f"repairs: {r['notes']}")
    return "\n".join(lines)
