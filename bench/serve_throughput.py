"""Serving throughput and latency: the continuous-batching engine against the generate path, side by side.

    python bench/serve_throughput.py [--model DIR] [--modes generate engine] [--concurrency 1 8 32 64]
                                     [--prompt-tokens 200] [--max-tokens 128] [--tag TAG]

Deploys the Serve app (serve/app.py) on a local Ray instance with one text-generation replica per mode, one
mode after the other, and drives /v1/completions over real HTTP with streaming clients (``stream: true``,
``stream_options.include_usage``) at each concurrency; each client sends ``--per-client`` requests in turn.
Modes: ``generate`` is transformers' generate over dynamic batches (``@serve.batch`` + the coalescer), the
path before the engine; ``engine`` is serve/engine.py (``max_batch_size`` slots, CUDA graphs on a GPU);
``engine-eager`` the same without CUDA graphs; ``engine-sdpa`` with CUDA graphs but without the Triton step
(PyTorch SDPA over span buckets); ``engine-unstreamed`` the engine with whole answers (as
``generate`` is measured). Reported per mode and concurrency: generated tokens/s,
requests/s, p50/p99 request latency and time to first token, and the engine's decode steps (mean batch,
median step time). Writes bench/results/serve_throughput[_TAG].json. Default model: the embedded tiny Llama.
"""

from __future__ import annotations

import argparse
import asyncio
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
PORT = 8731
MODES = {"generate": {"engine": "generate"}, "engine": {"engine": "continuous", "cuda_graphs": True},
         "engine-eager": {"engine": "continuous", "cuda_graphs": False},
         "engine-sdpa": {"engine": "continuous", "cuda_graphs": True, "kernels": False},
         "engine-unstreamed": {"engine": "continuous", "cuda_graphs": True}}
# The generate path streams one request at a time (a streamer per generate call: 6 tokens/s at 8 clients on
# an H100); its batched path is the non-streamed one, so that is what it is measured with.
STREAMED = {"generate": False, "engine": True, "engine-eager": True, "engine-sdpa": True, "engine-unstreamed": False}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


async def drive(url: str, concurrency: int, per_client: int, max_tokens: int, prompts: list[str],
                stream: bool = True) -> dict:
    """``concurrency`` clients, each sending ``per_client`` requests one after the other; streamed requests
    time their first token, others count the whole answer as the first token's wait."""
    import httpx

    latencies, ttfts, tokens, errors = [], [], 0, 0

    async def one(h, prompt: str):
        nonlocal tokens, errors
        t = time.perf_counter()
        first = None
        body = {"prompt": prompt, "temperature": 0, "max_tokens": max_tokens, "stream": stream}
        if not stream:
            r = await h.post(f"{url}/v1/completions", json=body)
            latencies.append(time.perf_counter() - t)
            ttfts.append(latencies[-1])
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                errors += 1
            return
        body["stream_options"] = {"include_usage": True}
        async with h.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                errors += 1
                await r.aread()
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if first is None and ev["choices"] and ev["choices"][0].get("text"):
                    first = time.perf_counter() - t
                if ev.get("usage"):
                    tokens += ev["usage"]["completion_tokens"]
        latencies.append(time.perf_counter() - t)
        ttfts.append(first if first is not None else latencies[-1])

    async def client(h, c: int):
        for i in range(per_client):
            await one(h, prompts[(c * per_client + i) % len(prompts)])

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as h:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(h, c) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    n = len(latencies)
    return {"concurrency": concurrency, "requests": n, "errors": errors, "wall_s": round(wall, 3),
            "requests_per_s": round(n / wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "completion_tokens": tokens, "p50_latency_s": pct(latencies, 0.5), "p99_latency_s": pct(latencies, 0.99),
            "p50_ttft_s": pct(ttfts, 0.5), "p99_ttft_s": pct(ttfts, 0.99)}


def make_prompts(model: str, n_tokens: int, count: int = 64) -> list[str]:
    """``count`` different prompts of about ``n_tokens`` tokens each, cut from the README's text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok((ROOT / "README.md").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    step = max(1, (len(ids) - n_tokens) // count)
    return [tok.decode(ids[i * step: i * step + n_tokens]) for i in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="merged model directory (default: the embedded tiny Llama)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=["generate", "engine"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--generate-concurrency", type=int, nargs="+", help="generate mode only at these (default: all)")
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends, one after another")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64, help="generate: @serve.batch size; engine: slots")
    ap.add_argument("--batch-wait", type=float, default=0.01, help="@serve.batch wait timeout (s)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    os.chdir(ROOT)

    import ray
    import torch
    from ray import serve

    from orchestrator.core.config import load_config
    from orchestrator.data.base import ensure_base_model
    from orchestrator.deployment.launcher import start

    model = args.model
    if not model:
        cfg = load_config(ROOT / "configs/constitution-qa-tiny.yaml")
        ensure_base_model(cfg)
        model = cfg.model.name_or_path
    prompts = make_prompts(str(model), args.prompt_tokens)
    gpu = torch.cuda.is_available()
    ray.init(include_dashboard=False, log_to_driver=False)
    results = []
    for mode in args.modes:
        spec = {"name": "bench", "task": "causal_lm", "path": str(model), "num_cpus": 0, "num_gpus": 1 if gpu else 0,
                "max_batch_size": args.batch_size, "batch_wait_timeout_s": args.batch_wait,
                "max_tokens_limit": args.max_tokens, "max_input_length": args.prompt_tokens + 64,
                "max_ongoing_requests": max(256, 2 * max(args.concurrency)), "max_queued_requests": -1,
                **MODES[mode]}
        t0 = time.perf_counter()
        try:
            url = start({"models": [spec]}, "127.0.0.1", PORT)
        except Exception as e:  # record it and go on with the other modes
            results.append({"mode": mode, "error": f"{type(e).__name__}: {str(e)[-1500:]}"})
            print(json.dumps(results[-1]), flush=True)
            continue
        deploy_s = round(time.perf_counter() - t0, 1)
        asyncio.run(drive(url, 4, 1, 8, prompts))  # warm-up
        gen = serve.get_deployment_handle("TextGenerator-bench", "orchestrator")
        for c in (args.generate_concurrency or args.concurrency) if mode == "generate" else args.concurrency:
            seen = len(gen.batch_log.remote().result())
            r = asyncio.run(drive(url, c, args.per_client, args.max_tokens, prompts, STREAMED[mode]))
            log = gen.batch_log.remote().result()[seen:]  # generate calls, or the engine's decode steps
            r.update(mode=mode, streamed=STREAMED[mode], deploy_s=deploy_s, steps=len(log),
                     mean_batch_size=round(statistics.mean(n for n, _ in log), 2) if log else None,
                     median_step_s=round(statistics.median(s for _, s in log), 4) if log else None)
            print(json.dumps(r), flush=True)
            results.append(r)
        serve.delete("orchestrator")
    serve.shutdown()
    by = {(r["mode"], r["concurrency"]): r for r in results if "error" not in r}
    ratios = {}
    if len(args.modes) > 1:
        base = args.modes[0]
        ratios = {f"{m}/{base}": {c: round(by[(m, c)]["tokens_per_s"] / by[(base, c)]["tokens_per_s"], 2)
                                  for c in args.concurrency if (m, c) in by and (base, c) in by}
                  for m in args.modes[1:]}
    out = {"command": "python bench/serve_throughput.py " + " ".join(sys.argv[1:]),
           "device": torch.cuda.get_device_name(0) if gpu else f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
           "commit": os.environ.get("BENCH_COMMIT") or subprocess.run(
               ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
           "versions": {"torch": torch.__version__, "ray": ray.__version__},
           "model": str(model).replace(f"{ROOT}/", ""), "prompt_tokens": args.prompt_tokens,
           "max_tokens": args.max_tokens, "results": results, "tokens_per_s_ratios": ratios}
    path = ROOT / f"bench/results/serve_throughput{('_' + args.tag) if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("tokens/s ratios:", ratios)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
