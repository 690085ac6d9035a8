"""Serving throughput and latency, dynamic batching on vs. off, side by side in one run.

    python bench/serve_throughput.py [--model DIR] [--concurrency 1 8 32] [--requests 64] [--max-tokens 32]

Deploys the Serve app (serve/app.py) on a local Ray instance with one text-generation replica, once with
``max_batch_size`` 1 (no batching) and once with batching, and drives /v1/completions over real HTTP at
each concurrency. Reports requests/s, generated tokens/s, p50/p99 latency; writes
bench/results/serve_throughput[_TAG].json. Default model: the embedded tiny Llama (built if missing).
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


async def drive(url: str, concurrency: int, n: int, max_tokens: int, prompts: list[str]) -> dict:
    import httpx

    latencies, tokens, errors = [], 0, 0
    queue = list(range(n))

    async def user(h):
        nonlocal tokens, errors
        while queue:
            i = queue.pop()
            t = time.perf_counter()
            r = await h.post(f"{url}/v1/completions", json={"prompt": prompts[i % len(prompts)], "temperature": 0,
                                                            "max_tokens": max_tokens})
            latencies.append(time.perf_counter() - t)
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=600) as h:
        t0 = time.perf_counter()
        await asyncio.gather(*(user(h) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"concurrency": concurrency, "requests": n, "errors": errors, "wall_s": round(wall, 3),
            "requests_per_s": round(n / wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "p50_s": round(statistics.median(lat), 4), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="merged model directory (default: the embedded tiny Llama)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batch-wait", type=float, default=0.01, help="@serve.batch wait timeout (s)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    os.chdir(ROOT)

    import ray
    from ray import serve

    from orchestrator.config import load_config
    from orchestrator.deploy import start
    from orchestrator.tiny import ensure_base_model

    model = args.model
    if not model:
        cfg = load_config(ROOT / "configs/constitution-qa-tiny.yaml")
        ensure_base_model(cfg)
        model = cfg.model.name_or_path
    prompts = [f"Question: What does Article {n} of the Constitution of Nepal provide?\nAnswer:" for n in range(1, 60)]
    import torch

    gpu = torch.cuda.is_available()
    ray.init(include_dashboard=False, log_to_driver=False)
    results = []
    for label, bs in (("batching off", 1), (f"batching on (max {args.batch_size})", args.batch_size)):
        spec = {"name": "bench", "task": "causal_lm", "path": str(model), "num_cpus": 0, "num_gpus": 1 if gpu else 0,
                "max_batch_size": bs, "batch_wait_timeout_s": args.batch_wait, "max_tokens_limit": args.max_tokens,
                "max_input_length": 256, "max_ongoing_requests": max(64, args.batch_size * 2),
                "max_queued_requests": -1}
        url = start({"models": [spec]}, "127.0.0.1", PORT)
        asyncio.run(drive(url, 4, 8, args.max_tokens, prompts))  # warm-up
        gen = serve.get_deployment_handle("TextGenerator-bench", "orchestrator")
        for c in args.concurrency:
            seen = len(gen.batch_log.remote().result())
            r = asyncio.run(drive(url, c, max(args.requests, c), args.max_tokens, prompts))
            log = gen.batch_log.remote().result()[seen:]  # what @serve.batch actually grouped, and its cost
            r["mode"] = label
            r["batches"] = len(log)
            r["mean_batch_size"] = round(statistics.mean(n for n, _ in log), 2) if log else None
            r["median_batch_generate_s"] = round(statistics.median(s for _, s in log), 3) if log else None
            # share of the wall time the replica spent inside generate (the rest: waiting for requests)
            r["generate_busy_fraction"] = round(sum(s for _, s in log) / r["wall_s"], 3)
            r["batch_sizes"] = [n for n, _ in log]
            print(json.dumps(r))
            results.append(r)
        serve.delete("orchestrator")
    serve.shutdown()
    by = {(r["mode"].split(" (")[0], r["concurrency"]): r for r in results}
    ratios = {c: round(by[("batching on", c)]["tokens_per_s"] / by[("batching off", c)]["tokens_per_s"], 2)
              for c in args.concurrency}
    out = {"command": "python bench/serve_throughput.py " + " ".join(sys.argv[1:]),
           "device": torch.cuda.get_device_name(0) if gpu else f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
           "commit": os.environ.get("BENCH_COMMIT") or subprocess.run(
               ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
           "versions": {"torch": torch.__version__, "ray": ray.__version__},
           "model": str(model).replace(f"{ROOT}/", ""), "max_tokens": args.max_tokens, "results": results,
           "batched_over_unbatched_tokens_per_s": ratios}
    path = ROOT / f"bench/results/serve_throughput{('_' + args.tag) if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("tokens/s ratio batched/unbatched by concurrency:", ratios)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
