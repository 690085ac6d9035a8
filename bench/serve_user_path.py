"""Serving as users meet it: `orchestrator serve`'s own code path, streaming chat clients over HTTP, the compiled
transformers peer on the same card in the same call.

    python bench/serve_user_path.py --model DIR [--config configs/constitution-qa.yaml] [--set FIELD=VALUE ...]
        [--concurrency 1 8 32 64 128] [--per-client 2] [--repeat 3] [--prompt-tokens 200] [--max-tokens 128]
        [--client-procs N] [--peer] [--trace] [--tag T] [--direct]

Starts the app as `orchestrator serve CONFIG --model DIR [--set ...]` does (``run_serve``: the config's serve
section, readiness awaited), then at each concurrency drives closed-loop streaming clients
(``/v1/chat/completions``, ``stream: true``, temperature 0, distinct prompts of about ``--prompt-tokens`` tokens,
``--max-tokens`` new tokens; spread over processes of 16 clients that keep their connections, ``--client-procs``)
after a warm-up pass, ``--repeat`` measured passes (new prompts each; the median pass
by tokens/s is the result, every pass's figure beside it), reading the engine's own figures from ``/v1/stats``. Then it
shuts Serve and Ray down and, with ``--peer``, runs bench/peer_decode.py (transformers, static cache, compiled,
one static batch, no server) at 32 and 64 on the freed card. Writes bench/results/serve_user_path[_TAG].json
with ``device``, ``config``, ``overrides``, ``results`` and ``peer``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from record import write_result  # noqa: E402


def device_name() -> str:
    """The GPU's name without a CUDA context in this process (the replica sizes its cache from free memory)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


KEEP = ("steps", "tokens_generated", "tokens_prefilled", "preemptions", "blocks_free", "step_ms_p50", "step_ms_p90",
        "mean_sequences_per_step", "device_wait_share", "idle_s", "engine_ttft_ms_p50", "engine_ttft_ms_p99")


def stats(url: str, window_s: float | None = None) -> dict:
    """The (one) served model's engine figures; first-token times over the last ``window_s`` seconds."""
    import httpx

    params = {"window_s": window_s} if window_s else {}
    return next(iter(httpx.get(f"{url}/v1/stats", params=params, timeout=60).json()["models"].values()))


def run_peer(batches: list[int], prompt: int, new: int) -> dict[str, float]:
    out = Path(os.environ.get("OUT", "/tmp")) / "peer_decode.json"
    cmd = [sys.executable, str(ROOT / "bench/peer_decode.py"), "--batches", *map(str, batches), "--prompt",
           str(prompt), "--new", str(new), "--variants", "static", "--out", str(out)]
    subprocess.run(cmd, check=False, timeout=1200)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else []
    return {str(r["batch"]): r["new_tokens_per_s"] for r in runs if "new_tokens_per_s" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", default="configs/constitution-qa.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="measured passes per concurrency; the median stands")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--peer", action="store_true")
    ap.add_argument("--trace", action="store_true", help="each request asks for the server's hop times "
                    "(x-orchestrator-trace); every pass gains the first token's time per hop")
    ap.add_argument("--tag", default="")
    ap.add_argument("--client-procs", type=int, default=None, help="processes the clients are spread over, each "
                    "keeping its connections from the warm-up on (unset: one per 16 clients; 0: all clients in this "
                    "process over a new connection pool per pass, as before)")
    ap.add_argument("--direct", action="store_true", help="clients skip Serve's HTTP proxy: Ray Serve's direct "
                    "ingress, the gateway replica's own port (measures what the proxy hop costs)")
    a = ap.parse_args()
    if a.direct:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    import ray
    from clients import passes, prompts, use_tokenizer
    from ray import serve

    from orchestrator.deployment.launcher import run_serve

    use_tokenizer(a.model)
    res = {"device": device_name(), "config": a.config, "overrides": a.overrides, "model": a.model,
           "commit": os.environ.get("BENCH_COMMIT") or _commit(), "prompt_tokens": a.prompt_tokens,
           "max_tokens": a.max_tokens, "per_client": a.per_client, "results": [], "peer": {}}
    t0 = time.perf_counter()
    url = run_serve([ROOT / a.config], a.overrides, [a.model], blocking=False)
    res["ready_s"] = round(time.perf_counter() - t0, 1)
    if a.direct:
        url = res["url"] = _gateway_port()
    res["engine"] = stats(url)
    for c in a.concurrency:
        done = []
        with passes(c, a.client_procs) as run:
            run(url, c, 1, a.max_tokens, prompts(c, a.prompt_tokens, c + 1000))  # warm-up, not counted
            for rep in range(a.repeat):
                texts = prompts(c * a.per_client, a.prompt_tokens, c + 7919 * rep)
                before = stats(url)
                t_before = time.perf_counter()
                r = run(url, c, a.per_client, a.max_tokens, texts, trace=a.trace)
                outside = time.perf_counter() - t_before - r["wall_s"]  # the engine idles around the pass
                after = stats(url, r["wall_s"] + 0.2)
                r["engine_after"] = {k: v for k, v in after.items() if k in KEEP}
                # the engine's share of the pass: idle (no request in it), steps, its own submit -> first token
                idle = max(0.0, after["idle_s"] - before["idle_s"] - outside)
                r["engine_idle_share"] = round(idle / r["wall_s"], 3)
                r["engine_steps"] = after["steps"] - before["steps"]
                if r["ttft_p50_s"] and after.get("engine_ttft_ms_p50") is not None:
                    r["http_ttft_ms_p50"] = round(1e3 * r["ttft_p50_s"] - after["engine_ttft_ms_p50"], 1)
                done.append(r)
        # the median pass by tokens/s (the lower of the middle two) stands; every pass's figure is kept beside it
        r = sorted(done, key=lambda p: p["tokens_per_s"])[(len(done) - 1) // 2]
        r = r | {"passes_tokens_per_s": [p["tokens_per_s"] for p in done],
                 "passes_ttft_p99_s": [p["ttft_p99_s"] for p in done],
                 "passes_errors": [p["errors"] for p in done]}
        res["results"].append(r)
        print(json.dumps(r), flush=True)
        write_result("serve_user_path", a.tag, res)
    serve.shutdown()
    ray.shutdown()
    if a.peer:
        res["peer"] = run_peer([32, 64], a.prompt_tokens, a.max_tokens)
        for c in ("32", "64"):
            mine = next((r["tokens_per_s"] for r in res["results"] if str(r["concurrency"]) == c), None)
            if mine and res["peer"].get(c):
                res.setdefault("vs_peer", {})[c] = round(mine / res["peer"][c], 3)
    write_result("serve_user_path", a.tag, res)
    print(json.dumps({k: res[k] for k in ("device", "peer", "ready_s")} | {"vs_peer": res.get("vs_peer")}))


def _gateway_port() -> str:
    """The URL the gateway replica itself listens on under direct ingress (Serve's range from port 30000)."""
    import httpx

    for port in range(30000, 30016):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return f"http://127.0.0.1:{port}"
        except httpx.HTTPError:
            continue
    raise RuntimeError("no gateway replica answers on ports 30000-30015")


def _commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or None


if __name__ == "__main__":
    main()
