"""Streaming chat clients over real HTTP, as users drive the served models: closed loop (each client sends its next
request when the last one ended), ``/v1/chat/completions`` with ``stream: true``, greedy, a fixed number of new
tokens asked. Used by bench/serve_user_path.py and bench/serve_multilora.py."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

WORDS = ("constitution article parliament federal province citizen right duty court judge president minister "
         "assembly election commission law justice freedom equality property language culture religion state "
         "local government budget tax army police health education labour land water forest river mountain "
         "village city district office member house national council power vote party people nation").split()


TOKENIZER = None  # the served model's tokenizer (``use_tokenizer``): prompts are cut to exact token counts


def use_tokenizer(model_dir: str) -> None:
    global TOKENIZER
    from transformers import AutoTokenizer

    TOKENIZER = AutoTokenizer.from_pretrained(model_dir)


def prompts(n: int, tokens: int, seed: int = 0, prefix: str = "") -> list[str]:
    """``n`` distinct prompts of ``tokens`` tokens of the served tokenizer (about that many without one): random
    words, no two sharing a prefix beyond ``prefix``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(tokens))
        if TOKENIZER is not None:
            text = TOKENIZER.decode(TOKENIZER(text, add_special_tokens=False)["input_ids"][:tokens])
        out.append(prefix + text)
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


# A traced request's way to its first token, hop by hop: (name, from, to) over the server's ``: trace`` times and
# the client's own (the server's clock is the client's: same host)
HOPS = (
    ("client -> gateway", "client_sent", "gateway_in"),
    ("gateway", "gateway_in", "gateway_call"),
    ("gateway -> replica", "gateway_call", "replica_in"),
    ("replica admission", "replica_in", "engine_submit"),
    ("engine: queue + prefill", "engine_submit", "engine_first"),
    ("engine -> replica loop", "engine_first", "replica_first"),
    ("replica -> gateway", "replica_first", "gateway_first"),
    ("gateway -> client", "gateway_first", "client_first"),
)


def hop_times(traces: list[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Per hop, p50 and p90 of its milliseconds over the traced requests that have both ends."""
    out = {}
    for name, a, b in HOPS:
        xs = [1e3 * (t[b] - t[a]) for t in traces if a in t and b in t]
        out[name] = {"p50_ms": pct(xs, 0.5), "p90_ms": pct(xs, 0.9)}
    return out


async def drive(url: str, concurrency: int, per_client: int, max_tokens: int, texts: list[str],
                models: list[str | None] | None = None, token: str | None = None, trace: bool = False) -> dict:
    """``concurrency`` clients, each sending ``per_client`` requests one after the other (client i asks model
    ``models[i % len(models)]``); generated tokens/s over the wall time, TTFT, latency, errors. ``trace``: each
    request asks for the server's hop times, and the result gains ``hops`` (``hop_times``)."""
    import httpx

    ttfts, latencies, gaps, tokens, errors = [], [], [], 0, 0
    error_codes: dict[str, int] = {}  # status (and the server's message) -> count
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if trace:
        headers["x-orchestrator-trace"] = "1"
    traces: list[dict[str, float]] = []

    async def one(h, text: str, model: str | None):
        nonlocal tokens, errors
        body = {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": max_tokens,
                "stream": True, "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        t0, sent = time.perf_counter(), time.time()
        first = last = None
        async with h.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                errors += 1
                key = f"{r.status_code} {(await r.aread())[:120].decode(errors='replace')}"
                error_codes[key] = error_codes.get(key, 0) + 1
                return
            async for line in r.aiter_lines():
                if line.startswith(": trace ") and first is not None:
                    traces.append(json.loads(line[8:]) | {"client_sent": sent,
                                                          "client_first": sent + (first - t0)})
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                now = time.perf_counter()
                if ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"):
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                if ev.get("usage"):
                    tokens += ev["usage"]["completion_tokens"]
        if first is not None:
            ttfts.append(first - t0)
        latencies.append(time.perf_counter() - t0)

    async def client(h, i: int):
        for k in range(per_client):
            model = models[i % len(models)] if models else None
            await one(h, texts[(i * per_client + k) % len(texts)], model)

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as h:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(h, i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": concurrency * per_client, "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2), "errors": errors,
            "error_codes": error_codes,
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99), "latency_p50_s": pct(latencies, 0.5),
            "latency_p99_s": pct(latencies, 0.99), "stream_gap_p50_s": pct(gaps, 0.5),
            "stream_gap_p99_s": pct(gaps, 0.99),
            "mean_tokens_per_request": round(tokens / max(1, concurrency * per_client - errors), 1)} | (
        {"hops": hop_times(traces), "traced": len(traces)} if trace else {})


def level(url: str, concurrency: int, per_client: int, max_tokens: int, prompt_tokens: int, seed: int,
          models: list[str | None] | None = None, prefix: str = "") -> dict:
    """A warm-up pass (one request per client, not counted), then the measured pass."""
    warm = prompts(concurrency, prompt_tokens, seed + 1000, prefix)
    asyncio.run(drive(url, concurrency, 1, max_tokens, warm, models))
    texts = prompts(concurrency * per_client, prompt_tokens, seed, prefix)
    return asyncio.run(drive(url, concurrency, per_client, max_tokens, texts, models))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0
