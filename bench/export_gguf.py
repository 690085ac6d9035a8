"""GGUF export at every quantization, each file checked by llama.cpp against the merged transformers model.

    python bench/export_gguf.py --adapter runs/demo/constitution-qa-tiny/adapter [--check 16] [--new-tokens 32]

Writes bench/results/export_gguf.json: per quantization the file size, tensor types, export time and the share
of greedy token positions where llama.cpp and the merged model agree on held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/constitution-qa-tiny.yaml")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--check", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    from orchestrator.artifacts.adapters import follow_adapter_base
    from orchestrator.artifacts.export import QUANTS, export_gguf
    from orchestrator.core.config import load_config
    from orchestrator.core.runtime import init_ray

    out = Path(tempfile.mkdtemp(prefix="gguf-"))
    cfg = follow_adapter_base(load_config(args.config, [f"output_dir={out}"]), args.adapter)
    init_ray(log_file=out / "ray.log")
    results = {}
    for quant in QUANTS:
        r = export_gguf(cfg, args.adapter, quant, out / f"{quant}.gguf", args.check, args.new_tokens)
        results[quant] = {k: v for k, v in r.items() if k not in ("path", "adapter", "base")}
        print(quant, json.dumps(results[quant]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    doc = {"command": "python bench/export_gguf.py " + " ".join(sys.argv[1:]), "commit": commit.stdout.strip(),
           "device": f"{platform.machine()}, {os.cpu_count()} cores, CPU", "config": args.config,
           "results": results}
    path = ROOT / "bench/results/export_gguf.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
