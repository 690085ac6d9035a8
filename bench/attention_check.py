"""The engine's paged attention for decoding tokens alone on a GPU: launch settings against the shipped ones.

    python bench/attention_check.py [--tag TAG]

Per shape (sequences x query heads / kv heads, head dim 128, blocks of 32 positions, about 250 cached positions
each, blocks scattered over the cache as the engine's pool leaves them), the time of one launch and the bandwidth
it reaches over the cached k/v it must read, for cache blocks per loop iteration (``KB``), warps and pipeline
stages, each timed inside a CUDA graph as the engine runs it; each variant's output against the shipped setting's. Writes bench/results/attention_check[_TAG].json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve import kernels  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))

from record import write_result  # noqa: E402
from timing import replay_ms  # noqa: E402


def case(seqs: int, heads: int, kv_heads: int, d: int = 128, bs: int = 32, ctx: int = 250, spread: int = 50):
    dev = "cuda"
    per = (ctx + spread) // bs + 2
    total = seqs * per + 1
    k = torch.randn(total, kv_heads, bs, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.zeros(seqs, 48, dtype=torch.int32, device=dev)  # 1,536 positions of 32, as the engine's
    table[:, :per] = (torch.randperm(total - 1, device=dev)[: seqs * per] + 1).view(seqs, per).to(torch.int32)
    t = 64 if seqs > 32 else 32  # the step's bucket: rows past the sequences are padding (tile_len 0)
    lens = torch.randint(ctx - spread, ctx + spread, (seqs,))
    z = dict(dtype=torch.long, device=dev)
    pos, tile_row, tile_start, tile_len = (torch.zeros(t, **z) for _ in range(4))
    pos[:seqs], tile_row[:seqs], tile_start[:seqs], tile_len[:seqs] = lens.to(dev), torch.arange(seqs), \
        torch.arange(seqs), 1
    q = torch.randn(t, heads, d, device=dev, dtype=torch.bfloat16)
    read = int((lens + 1).sum()) * kv_heads * d * 2 * 2
    return (q, k, v, table, tile_row, tile_start, tile_len, pos), seqs, read


def timed(args, launch, layers: int = 32, reps: int = 10) -> tuple[float, torch.Tensor]:
    """Milliseconds per launch: ``layers`` launches captured in one CUDA graph (as the engine's step runs them, no
    host launch cost), replayed ``reps`` times."""
    out = kernels.paged_attention(*args, 0.088, 0, 16, launch)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.paged_attention(*args, 0.088, 0, 16, launch)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(layers):
            kernels.paged_attention(*args, 0.088, 0, 16, launch)
    return replay_ms(g, reps) / layers, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("BENCH_COMMIT"), "shapes": {}}
    for seqs, heads, kv_heads, ctx in ((56, 32, 32, 250), (32, 32, 32, 250), (56, 32, 8, 250), (56, 32, 32, 1000)):
        args, n, read = case(seqs, heads, kv_heads, ctx=ctx)
        base_ms, base = timed(args, None)
        rows = [{"KB": "shipped", "num_warps": "shipped", "num_stages": "shipped", "ms": round(base_ms, 4),
                 "gb_s": round(read / base_ms / 1e6)}]
        for kb, warps, stages in itertools.product((1, 2, 4), (2, 4, 8), (2, 3, 4)):
            launch = {"single": {"KB": kb, "num_warps": warps, "num_stages": stages}}
            try:
                ms, out = timed(args, launch)
            except Exception as e:  # noqa: BLE001 (a setting the compiler refuses: recorded, not fatal)
                rows.append({"KB": kb, "num_warps": warps, "num_stages": stages, "error": str(e)[:200]})
                continue
            err = (out[:n].float() - base[:n].float()).abs().max().item()
            rows.append({"KB": kb, "num_warps": warps, "num_stages": stages, "ms": round(ms, 4),
                         "gb_s": round(read / ms / 1e6), "max_abs_diff": round(err, 5)})
        again, _ = timed(args, None)  # the shipped setting once more: the spread between two timings of one setting
        rows.append({"KB": "shipped", "num_warps": "shipped", "num_stages": "shipped (again)", "ms": round(again, 4),
                     "gb_s": round(read / again / 1e6)})
        best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"])
        key = f"{seqs}x{heads}/{kv_heads}@{ctx}"
        res["shapes"][key] = {"bytes": read, "shipped": rows[0], "best": best, "runs": rows}
        print(json.dumps({key: {"shipped": rows[0], "best": best}}), flush=True)
    write_result("attention_check", a.tag, res)


if __name__ == "__main__":
    main()
