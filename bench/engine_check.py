"""The decode engine's Triton step against its PyTorch (SDPA) step on a GPU: agreement and step time.

    python bench/engine_check.py --model DIR [--batches 1 8 32 64] [--tag TAG]

1. Agreement: both decoders prefill the same prompts (random tokens, lengths 100-300) and decode 32 greedy
   steps fed the same tokens; each is compared with transformers' own forward over the same tokens (the
   share of argmaxes that agree, the largest logit difference over the logits' spread): two bf16 paths
   differ in rounding, so the PyTorch step's figure is the yardstick for the Triton step's.
2. Step time: each engine's captured decode graph replayed 50 times per batch size with the rows at
   positions spread over 200-328 (the serving bench's 200-token prompts, 128 new tokens), timed with CUDA
   events; the HBM bound counts the weights plus each row's KV cache once.
3. The engine driven in-process (no HTTP, no Ray): 32 and 64 callers, one request each (the peers' closed
   batch) and six each (steady state).
4. The packed prefill graph for 1-8 prompts of 200 tokens; the attention kernel's variants alone per batch
   size; the Triton step's GPU time per kernel at 32.
Writes bench/results/engine_check[_TAG].json.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve.engine import Engine

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    slots, max_len = max(args.batches), 512
    out: dict = {"device": torch.cuda.get_device_name(), "model": Path(args.model).name, "slots": slots,
                 "max_len": max_len, "torch": torch.__version__}
    out["direct"] = []
    for c, r in ((32, 1), (32, 6), (64, 1), (64, 6)):
        if c <= slots:
            out["direct"].append(direct(model, tok, slots, max_len, c, r))
            gc.collect()  # the finished engine (its cache) before the next one
            torch.cuda.empty_cache()
    engines = {}
    for name, kernels in (("triton", True), ("sdpa", False)):
        engines[name] = Engine(model, tok, slots=slots, max_len=max_len, use_kernels=kernels)
        engines[name].shutdown()  # only its decoder and graphs are used here
    assert engines["triton"].dec.kernels and not engines["sdpa"].dec.kernels

    with torch.inference_mode():
        n = 8
        lengths = torch.randint(100, 300, (n,), device=dev)
        ids = torch.randint(0, model.config.vocab_size, (n, 300), device=dev)
        prompts = [ids[i, :lengths[i]].tolist() for i in range(n)]
        first = {k: e.dec.prefill(*e.dec.unpack(e.dec.pack(prompts, list(range(n))).to(dev), int(lengths.sum())))
                 for k, e in engines.items()}
        pos, cur = lengths.clone(), first["sdpa"].argmax(-1)
        fed, logits = [], {k: [first[k]] for k in engines}
        for _ in range(32):
            fed.append(cur)
            for k, e in engines.items():
                logits[k].append(e.dec.decode(cur, pos, max_len))
            cur, pos = logits["sdpa"][-1].argmax(-1), pos + 1
        fed = torch.stack(fed, 1)  # [n, 32]
        # transformers' own forward over prompt + fed tokens: the reference both decoders are compared with
        ref = torch.stack([model(torch.cat([ids[i, :lengths[i]], fed[i]])[None]).logits[0, -33:].float()
                           for i in range(n)], 1)  # [32, n, vocab]
        out["agreement"] = {"steps": 33, "rows": n, "note": "step 0: the packed prefill's logits"}
        for k in engines:
            got = torch.stack(logits[k])
            spread = (ref.amax(-1) - ref.amin(-1))[..., None]
            out["agreement"][k] = {"argmax_vs_transformers": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                                   "max_logit_diff_over_spread": ((got - ref).abs() / spread).max().item()}
        a, b = torch.stack(logits["triton"]), torch.stack(logits["sdpa"])
        out["agreement"]["argmax_triton_vs_sdpa"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        print(json.dumps(out["agreement"]), flush=True)

        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        cfg = model.config
        kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        kv_per_token = 2 * cfg.num_hidden_layers * kv_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
        bw = {"H100": 3.35e12, "H200": 4.8e12}
        peak = next((v for k, v in bw.items() if k in out["device"]), None)
        out["steps"] = []
        for b in args.batches:
            positions = torch.linspace(200, 327, b, device=dev).long()
            row = {"batch": b}
            for name, e in engines.items():
                e.pos[:b] = positions
                span = e._bucket(e.span_buckets, int(positions.max()) + 1)
                g, _ = e.graphs[(e._bucket(e.batch_buckets, b), span)]
                row[f"{name}_ms"] = round(graph_ms(g, runs=50, warmup=3), 3)
            row["speedup"] = round(row["sdpa_ms"] / row["triton_ms"], 3)
            kv = kv_per_token * float(positions.sum() + b)
            if peak:
                row["hbm_bound_ms"] = round((weights + kv) / peak * 1e3, 3)
            out["steps"].append(row)
            print(json.dumps(row), flush=True)
        out["prefill"] = prefill_times(engines["triton"])
        out["attention_variants"] = attention_variants(engines["triton"], args.batches)
        out["profile_b32"] = profile(engines["triton"], min(32, slots))
    path = ROOT / "bench" / "results" / f"engine_check{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", path.relative_to(ROOT))


def direct(model, tok, slots: int, max_len: int, clients: int, per_client: int) -> dict:
    """The engine driven in-process, no server: ``clients`` callers each submit ``per_client`` requests one
    after another (random 200-token prompts, 128 greedy tokens, EOS ignored). With one request per client it
    is the peers' closed batch (bench/peer_decode.py), prefill included."""
    import threading
    import time

    import torch

    from serve.engine import Engine, Sampling

    eng = Engine(model, tok, slots=slots, max_len=max_len)
    eng.eos = set()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (200,), generator=gen).tolist() for _ in range(clients)]
    left, tokens, finished = [per_client] * clients, [0], threading.Event()
    lock = threading.Lock()
    pending = [clients]

    def client(i: int):
        def on_event(ev: dict) -> None:
            if "finish_reason" not in ev:
                return
            with lock:
                tokens[0] += ev["completion_tokens"]
                left[i] -= 1
                again = left[i] > 0
                if not again:
                    pending[0] -= 1
                    if pending[0] == 0:
                        finished.set()
            if again:
                eng.submit(prompts[i], Sampling(max_tokens=128), on_event)
        return on_event

    t0 = time.perf_counter()
    for i in range(clients):
        eng.submit(prompts[i], Sampling(max_tokens=128), client(i))
    assert finished.wait(300), "direct run did not finish"
    wall = time.perf_counter() - t0
    eng.shutdown()
    steps = [s for _, s in eng.steps]
    row = {"clients": clients, "per_client": per_client, "tokens": tokens[0], "wall_s": round(wall, 3),
           "tokens_per_s": round(tokens[0] / wall, 1),
           "median_step_ms": round(1e3 * statistics.median(steps), 2) if steps else None}
    print(json.dumps({"direct": row}), flush=True)
    return row


def graph_ms(g, runs: int = 10, warmup: int = 2) -> float:
    """Median GPU milliseconds of one replay of CUDA graph ``g`` (CUDA events), after ``warmup`` replays."""
    import torch

    times = []
    for _ in range(warmup + runs):
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        t.record()
        t.synchronize()
        times.append(s.elapsed_time(t))
    return statistics.median(times[warmup:])


def prefill_times(engine) -> list[dict]:
    """The prefill graph's time for 1, 2, 4 and 8 prompts of 200 tokens packed together."""

    rows = []
    for k in (1, 2, 4, 8):
        if 200 * k > engine.pack_tokens:
            break
        width = engine._bucket(engine.prefill_buckets, 200 * k)
        buf = engine.dec.pack([[1] * 200] * k, list(range(k)), width, engine.PACK)
        engine.pf_buf[:buf.shape[0]].copy_(buf)
        ms = graph_ms(engine.prefill_graphs[width][0])
        rows.append({"prompts": k, "tokens": 200 * k, "bucket": width, "ms": round(ms, 2),
                     "ms_per_prompt": round(ms / k, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def attention_variants(engine, batches: list[int]) -> list[dict]:
    """decode_attention alone on one layer's cache, per batch size: one program per (row, head) walking the
    row, or the rows split in chunks and merged (flash-decoding), for a few block sizes and warp counts."""
    import torch
    from triton.testing import do_bench

    from serve import kernels

    dec, rows = engine.dec, []
    variants = [{"block": bl, "warps": w} for bl in (32, 64, 128) for w in (4, 8)]
    variants += [{"chunk": c, "block": bl, "warps": 4} for c in (64, 128, 256) for bl in (32, 64) if bl <= c]
    for b in batches:
        positions = torch.linspace(200, 327, b, device=dec.device).long()
        q = torch.randn(b, dec.heads, dec.head_dim, device=dec.device, dtype=dec.dtype)
        row = {"batch": b}
        for v in variants:
            name = "_".join(f"{k}{x}" for k, x in v.items())
            run = functools.partial(kernels.decode_attention, q, dec.k[0], dec.v[0], positions, **v)
            row[name] = round(1e3 * do_bench(run, return_mode="median"), 2)
        best = min((k for k in row if k != "batch"), key=row.get)
        row["best"] = best
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def profile(engine, b: int) -> list[dict]:
    """GPU time per kernel over 5 eager Triton decode steps at batch ``b``: where a step's time goes."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    dec = engine.dec
    engine.pos[:b] = torch.linspace(200, 327, b, device=dec.device).long()
    for _ in range(2):
        dec.decode(engine.ids[:b], engine.pos[:b], engine.max_len)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            dec.decode(engine.ids[:b], engine.pos[:b], engine.max_len)
        torch.cuda.synchronize()
    rows = sorted(p.key_averages(), key=lambda e: -e.device_time_total)[:15]
    out = [{"kernel": e.key[:90], "calls_per_step": e.count // 5, "us_per_step": round(e.device_time_total / 5, 1)}
           for e in rows]
    for r in out:
        print(json.dumps(r), flush=True)
    return out


if __name__ == "__main__":
    main()
