"""Before a long GPU call: the engine's Triton step compiles, its CUDA graphs capture, and a small random model of
each family decodes greedily as transformers' generate does (float32 on both sides; the matrix units' tf32 may
split near-ties, so the share of tokens equal up to the first difference is reported, and the call stops early
below 0.8).

    python bench/gpu_smoke.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from serve.engine import Engine, Sampling
    from tests.tiny_families import CharTokenizer, make, prompts, run_all

    out = {}
    for family in ("llama3", "qwen3", "gemma3"):
        t0 = time.perf_counter()
        model = make(family, torch.float32).to("cuda")
        ps = prompts(6)
        with torch.no_grad():
            refs = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=16, min_new_tokens=16,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
                    for p in ps]
        eng = Engine(model, CharTokenizer(), max_seqs=8, max_len=128, num_blocks=64, prefill_chunk=16)
        eng.eos = set()
        seqs = run_all(eng, [(p, Sampling(max_tokens=16), None) for p in ps], timeout=600)
        stats = eng.stats()
        eng.shutdown()
        same = sum(next((i for i, (a, b) in enumerate(zip(s.tokens, r, strict=False)) if a != b), 16)
                   for s, r in zip(seqs, refs, strict=True))
        out[family] = {"equal_share": round(same / (16 * len(ps)), 3), "graphs": stats["cuda_graphs"],
                       "kernels": stats["kernels"], "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({family: out[family]}), flush=True)
    assert all(v["equal_share"] >= 0.8 and v["kernels"] and v["graphs"] for v in out.values()), out
    print("gpu smoke ok")


if __name__ == "__main__":
    main()
