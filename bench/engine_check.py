"""The decode engine in-process on a GPU (no HTTP, no Ray): correctness, prefix caching, chunked prefill, batch
invariance and the model families, each measured beside its counterpart in the same call.

    python bench/engine_check.py --model DIR [--parts agree prefix chunked invariant families] [--tag TAG]

* ``agree``: greedy tokens of 16 prompts decoded together against transformers' ``generate`` on each alone (bf16
  on both sides, so near-ties may split: the share of tokens equal up to the first difference).
* ``prefix``: 32 concurrent requests sharing a 1,000-token prefix (each with its own 40-token question), with
  prefix caching on and off: TTFT p50/p99, tokens/s, hit rate.
* ``chunked``: 32 streams decoding; a 2,000-token prompt arrives; inter-token gaps of the 32 before and while it
  is prefilled (p50/p99), with the default chunk (512) and the prompt prefilled in one piece (4096).
* ``inprocess``: the serving bench's load (32 and 64 callers, 200 + 128 tokens) on the engine alone, with its
  step time and the share of the loop spent waiting for the device.
* ``profile``: a decode step's device time by kernel kind at 32 and 56 sequences (200 + about 60 positions), with
  the bandwidth the matmuls (weights) and attention (cached k/v) achieve.
* ``invariant``: tokens/s at 32 streams with ``batch_invariant`` off and on; a request's greedy tokens alone and
  among 31 others under each.
* ``families``: Llama, Mistral, Qwen 2, Qwen 3 and Gemma 3 of about 1.3B parameters each (random weights, same
  widths and depth), tokens/s at 32 streams of 200 + 128 tokens, each against the Llama figure.
Writes bench/results/engine_check[_TAG].json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from record import write_result  # noqa: E402

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")


class Tracker:
    """One request's events with their arrival times."""

    def __init__(self):
        self.times: list[float] = []
        self.t0 = time.perf_counter()
        self.done = threading.Event()
        self.tokens = 0

    def __call__(self, ev: dict) -> None:
        if "text" in ev:
            self.times.append(time.perf_counter())
        if "finish_reason" in ev:
            self.tokens = ev["completion_tokens"]
            self.done.set()


def pct(xs, q):
    xs = sorted(x for x in xs if x == x)  # NaN: a request whose tokens decoded to no text (random weights)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 5) if xs else None


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def closed_loop(engine, prompts: list[list[int]], new: int, rounds: int = 2) -> dict:
    """len(prompts) callers, each sending ``rounds`` requests in turn; generated tokens/s and TTFT."""
    from serve.engine import Sampling

    ttft, tokens = [], 0

    def caller(i: int) -> None:
        nonlocal tokens
        for r in range(rounds):
            t = Tracker()
            engine.submit(prompts[(i + r * 7) % len(prompts)], Sampling(max_tokens=new), t)
            t.done.wait(600)
            ttft.append(t.times[0] - t.t0 if t.times else float("nan"))
            tokens += t.tokens

    t0 = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(prompts))]
    [th.start() for th in threads]
    [th.join() for th in threads]
    wall = time.perf_counter() - t0
    return {"callers": len(prompts), "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": pct(ttft, 0.5),
            "ttft_p99_s": pct(ttft, 0.99)}


def make_engine(model, tok, **kw):
    import torch

    from serve.engine import Engine

    gc.collect()  # the last engine's cache and graphs (held in reference cycles) go before this one sizes itself
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    eng = Engine(model, tok, max_seqs=kw.pop("max_seqs", 256), max_len=kw.pop("max_len", 2560), **kw)
    eng.eos = set()
    return eng


def close(eng) -> None:
    import torch

    eng.shutdown()
    del eng
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_inprocess(model, tok, vocab: int) -> dict:
    """The engine alone (no HTTP, no Ray) with the serving bench's load: 32 and 64 callers, 200-token prompts,
    128 new tokens, two requests each; the engine's step figures beside."""
    out = {}
    eng = make_engine(model, tok, max_len=1536)
    for callers in (32, 64):
        closed_loop(eng, random_prompts(callers, 200, vocab, 11), 128, rounds=1)  # warm-up
        r = closed_loop(eng, random_prompts(callers, 200, vocab, 12), 128)
        st = eng.stats()
        out[str(callers)] = r | {k: st[k] for k in ("step_ms_p50", "step_ms_p90", "mean_sequences_per_step",
                                                    "device_wait_share")}
    close(eng)
    return out


def _kernel_kind(name: str) -> str:
    for key in ("paged_attention", "rope_write", "norm_add", "act_mul", "lora", "_matmul_kernel"):
        if key in name:
            return key
    if any(k in name for k in ("gemm", "nvjet", "cutlass", "sm90", "sm100", "xmma")):
        return "matmul (cuBLAS)"
    return "other: " + name[:60]


def part_profile(model, tok, vocab: int) -> dict:
    """Where a decode step's device time goes at the serving bench's loads (32 and 56 sequences of 200 prompt +
    50 or more generated positions, nothing else arriving): the step's wall time unprofiled (with 2, 3 and 4 steps
    queued on the device), kernel time per step by kind, the share of the window the GPU was busy, and the
    achieved bandwidth of the matmuls (weights) and of attention (the sequences' cached k/v)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from serve.engine import Sampling

    eng = make_engine(model, tok, max_len=1536)
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    fam = eng.fam
    kv_per_pos = 2 * len(model.model.layers) * fam.kv_heads * fam.head_dim * 2
    out = {"weight_bytes": weights}
    for seqs in (32, 56):
        trackers = [Tracker() for _ in range(seqs)]
        for p, t in zip(random_prompts(seqs, 200, vocab, 21 + seqs), trackers, strict=True):
            eng.submit(p, Sampling(max_tokens=400), t)
        while len(eng.running) < seqs or any(s.sampled < 50 for s in list(eng.running)):
            time.sleep(0.002)
        ctx = sum(s.fed for s in list(eng.running)) / seqs
        plain = []
        for depth in (3, 2, 4, 3):  # the step's wall time unprofiled, with 2-4 steps queued on the device
            eng.PIPELINE = depth
            time.sleep(0.03)
            s0, t0 = eng.counters["steps"], time.perf_counter()
            time.sleep(0.1)
            plain.append((depth, round(1e3 * (time.perf_counter() - t0) / (eng.counters["steps"] - s0), 3)))
        eng.PIPELINE = 3
        s0, t0 = eng.counters["steps"], time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            time.sleep(0.12)
            torch.cuda.synchronize()
        steps, wall = eng.counters["steps"] - s0, time.perf_counter() - t0
        kinds: dict[str, float] = {}
        launches = 0  # paged attention runs twice per layer (decoding tokens, prompt tiles): steps the kernels saw
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
            if us and e.device_type is not None and "DeviceType.CUDA" in str(e.device_type):
                kinds[_kernel_kind(e.key)] = kinds.get(_kernel_kind(e.key), 0.0) + us
                launches += e.count if _kernel_kind(e.key) == "paged_attention" else 0
        if launches:
            steps = launches / (2 * len(model.model.layers))
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if "DeviceType.CUDA" in str(e.device_type) and e.time_range.end > e.time_range.start)
        covered, reach = 0.0, None
        for a, b in spans:  # the union of the kernels' intervals: how much of the window the GPU was busy
            if reach is None or a > reach:
                covered, reach = covered + (b - a), b
            elif b > reach:
                covered, reach = covered + (b - reach), b
        span = (spans[-1][1] - spans[0][0]) if spans else 0.0
        for t in trackers:
            t.done.wait(600)
        per_step = {k: round(v / 1e3 / steps, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
        busy = sum(per_step.values())
        mm, att = per_step.get("matmul (cuBLAS)", 0.0), per_step.get("paged_attention", 0.0)
        out[str(seqs)] = {"steps": steps, "wall_ms_per_step_unprofiled": plain,
                          "wall_ms_per_step_profiled": round(1e3 * wall / steps, 3),
                          "gpu_busy_share": round(covered / span, 3) if span else None,
                          "kernel_ms_per_step": round(busy, 3), "mean_positions": round(ctx, 1),
                          "matmul_gb_s": round(weights / (mm / 1e3) / 1e9) if mm else None,
                          "attention_gb_s": round(seqs * ctx * kv_per_pos / (att / 1e3) / 1e9) if att else None,
                          "by_kind_ms": per_step}
    close(eng)
    return out


def part_agree(model, tok, vocab: int) -> dict:
    import torch

    prompts = random_prompts(16, 120, vocab, 1)
    eng = make_engine(model, tok, max_seqs=16, max_len=512)
    seqs = []
    done = []
    from serve.engine import Sampling

    for p in prompts:
        t = Tracker()
        seqs.append(eng.submit(p, Sampling(max_tokens=32), t))
        done.append(t)
    [t.done.wait(300) for t in done]
    close(eng)
    same = total = 0
    for p, s in zip(prompts, seqs, strict=True):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p], device=DEVICE), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        k = next((i for i, (a, b) in enumerate(zip(s.tokens, ref, strict=False)) if a != b), len(ref))
        same, total = same + k, total + len(ref)
    return {"prompts": 16, "tokens_equal_until_first_difference": round(same / total, 4)}


def part_prefix(model, tok, vocab: int) -> dict:
    head = random_prompts(1, 1000, vocab, 2)[0]
    prompts = [head + q for q in random_prompts(32, 40, vocab, 3)]
    out = {}
    for caching in (True, False):
        eng = make_engine(model, tok, prefix_caching=caching)
        out["cached" if caching else "uncached"] = closed_loop(eng, prompts, 64) | {
            "hit_rate": eng.stats()["prefix_hit_rate"]}
        close(eng)
        del eng  # the next engine sizes itself from free memory: no reference may keep this one's cache
    out["ttft_p50_ratio"] = round(out["cached"]["ttft_p50_s"] / out["uncached"]["ttft_p50_s"], 3)
    out["tokens_per_s_ratio"] = round(out["cached"]["tokens_per_s"] / out["uncached"]["tokens_per_s"], 3)
    return out


def part_chunked(model, tok, vocab: int) -> dict:
    from serve.engine import Sampling

    out = {}
    for chunk in (512, 4096):
        eng = make_engine(model, tok, prefill_chunk=chunk, max_prefill=4096)
        streams = [Tracker() for _ in range(32)]
        for p, t in zip(random_prompts(32, 200, vocab, 4), streams, strict=True):
            eng.submit(p, Sampling(max_tokens=400), t)
        time.sleep(1.5)  # every stream decoding
        t_long = time.perf_counter()
        long = Tracker()
        eng.submit(random_prompts(1, 2000, vocab, 5)[0], Sampling(max_tokens=4), long)
        long.done.wait(120)
        t_end = time.perf_counter()
        [t.done.wait(300) for t in streams]
        before, during = [], []
        for t in streams:
            for a, b in zip(t.times, t.times[1:], strict=False):
                (during if t_long <= b <= t_end + 0.05 else before if b < t_long else []).append(b - a)
        out[f"chunk_{chunk}"] = {"gap_p50_before_s": pct(before, 0.5), "gap_p99_before_s": pct(before, 0.99),
                                 "gap_p50_during_s": pct(during, 0.5), "gap_p99_during_s": pct(during, 0.99),
                                 "long_prompt_ttft_s": round(long.times[0] - long.t0, 3) if long.times else None}
        c = out[f"chunk_{chunk}"]
        c["p99_ratio"] = round(c["gap_p99_during_s"] / c["gap_p99_before_s"], 2) if c["gap_p99_during_s"] else None
        close(eng)
        del eng
    return out


def part_invariant(model, tok, vocab: int) -> dict:
    from serve.engine import Sampling

    prompts = random_prompts(32, 200, vocab, 6)
    out = {}
    for inv in (False, True):
        eng = make_engine(model, tok, batch_invariant=inv)
        alone = Tracker()
        s = eng.submit(prompts[0], Sampling(max_tokens=64), alone)
        alone.done.wait(300)
        first = list(s.tokens)
        others = [Tracker() for _ in range(31)]
        for p, t in zip(prompts[1:], others, strict=True):
            eng.submit(p, Sampling(max_tokens=200), t)
        time.sleep(0.3)
        again = Tracker()
        s2 = eng.submit(prompts[0], Sampling(max_tokens=64), again)
        again.done.wait(300)
        [t.done.wait(300) for t in others]
        speed = closed_loop(eng, prompts, 128)
        out["on" if inv else "off"] = speed | {"same_tokens_alone_and_batched": first == s2.tokens}
        close(eng)
        del eng, s, s2
    out["cost"] = round(1 - out["on"]["tokens_per_s"] / out["off"]["tokens_per_s"], 3)
    return out


def family_model(kind: str):
    import torch
    import transformers as tf

    common = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=8, intermediate_size=5632, max_position_embeddings=4096)
    cfg = {"llama": lambda: tf.LlamaConfig(**common), "mistral": lambda: tf.MistralConfig(**common, sliding_window=4096),
           "qwen2": lambda: tf.Qwen2Config(**common), "qwen3": lambda: tf.Qwen3Config(**common, head_dim=128),
           "gemma3": lambda: tf.Gemma3TextConfig(**common, head_dim=128, sliding_window=512,
                                                 query_pre_attn_scalar=128)}[kind]()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    torch.set_default_dtype(torch.float32)
    return model


def part_families(tok) -> dict:
    out = {}
    for kind in ("llama", "mistral", "qwen2", "qwen3", "gemma3"):
        model = family_model(kind)
        n = sum(p.numel() for p in model.parameters())
        eng = make_engine(model, tok, max_len=1024)
        out[kind] = closed_loop(eng, random_prompts(32, 200, 32000, 7), 128) | {"parameters": n}
        close(eng)
        del eng, model  # this frame's references too: the next family's engine sizes itself from free memory
        gc.collect()
        print(json.dumps({kind: out[kind]}), flush=True)
    for kind in out:
        out[kind]["vs_llama"] = round(out[kind]["tokens_per_s"] / out["llama"]["tokens_per_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--parts", nargs="+", default=["agree", "inprocess", "prefix", "chunked", "invariant", "families"])
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    res = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "model": a.model, "parts": {},
           "commit": os.environ.get("BENCH_COMMIT")}
    model = None
    for part in a.parts:
        t0 = time.perf_counter()
        if part == "families":
            if model is not None:
                del model
                gc.collect()
                torch.cuda.empty_cache()
                model = None
            res["parts"][part] = part_families(tok)
        else:
            if model is None:
                dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
                model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(DEVICE).eval()
            vocab = model.config.vocab_size
            res["parts"][part] = globals()[f"part_{part}"](model, tok, vocab)
        res["parts"][part]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({part: res["parts"][part]}), flush=True)
        write_result("engine_check", a.tag, res)
    print("engine_check done")


if __name__ == "__main__":
    main()
