"""Tokenization throughput of the Ray Data pipelines (tokens/s) and how it scales with actors.

    python bench/tokenize_throughput.py [--actors 1 2] [--repeats 3]

For each corpus the raw rows are read once; then, per actor-pool size, the tokenization stage
(actor pool of tokenizers, plus packing for the constitution) is run to completion ``repeats`` times
and the median wall time is reported. Results go to bench/results/tokenize_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ray

    from orchestrator.core.config import load_config
    from orchestrator.data.base import ensure_base_model
    from orchestrator.data.pipelines import causal_lm_rows, ner_rows, split_stats, tokenize_dataset

    os.chdir(ROOT)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=ROOT).stdout.strip(), "repeats": args.repeats, "corpora": {}}
    for name in ("constitution-qa-tiny", "medical-ner-tiny"):
        cfg = load_config(ROOT / f"configs/{name}.yaml")
        ensure_base_model(cfg)
        if cfg.model.task == "causal_lm":
            raw, _, _ = causal_lm_rows(cfg)
            labels = None
        else:
            raw, labels, _ = ner_rows(cfg)
        rows = raw["train"]
        per = {}
        for n in args.actors:
            times, tokens = [], 0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ds = tokenize_dataset(cfg, rows, labels, actors=n).materialize()
                times.append(time.perf_counter() - t0)
                tokens = split_stats(cfg, ds)["tokens"]
            med = statistics.median(times)
            per[n] = {"median_s": round(med, 2), "tokens": tokens, "tokens_per_s": round(tokens / med)}
            print(f"{name:<22} actors={n}  {tokens} tokens  median {med:.2f} s  {tokens / med:,.0f} tokens/s")
        base = per[args.actors[0]]["tokens_per_s"]
        for n in args.actors:
            per[n]["speedup_vs_first"] = round(per[n]["tokens_per_s"] / base, 2)
        results["corpora"][name] = {"examples": len(rows), "by_actors": per}
    out = ROOT / "bench/results/tokenize_throughput.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
