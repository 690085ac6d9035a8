"""Streaming chat clients over real HTTP, as users drive the served models: closed loop (each client sends its next
request when the last one ended), ``/v1/chat/completions`` with ``stream: true``, greedy, a fixed number of new
tokens asked. Used by bench/serve_user_path.py and bench/serve_multilora.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
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


def _raw() -> dict:
    return {"ttfts": [], "latencies": [], "gaps": [], "tokens": 0, "errors": 0, "error_codes": {}, "traces": []}


async def _run(h, url: str, clients: list[int], per_client: int, max_tokens: int, texts: list[str],
               models: list[str | None] | None, headers: dict[str, str], raw: dict) -> None:
    """Clients ``clients`` (indices among all of the pass's), each sending ``per_client`` requests one after the
    other over ``h``; what they see goes into ``raw``."""

    async def one(text: str, model: str | None):
        body = {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": max_tokens,
                "stream": True, "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        t0, sent = time.perf_counter(), time.time()
        first = last = None
        async with h.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                raw["errors"] += 1
                key = f"{r.status_code} {(await r.aread())[:120].decode(errors='replace')}"
                raw["error_codes"][key] = raw["error_codes"].get(key, 0) + 1
                return
            async for line in r.aiter_lines():
                if line.startswith(": trace ") and first is not None:
                    raw["traces"].append(json.loads(line[8:]) | {"client_sent": sent,
                                                                 "client_first": sent + (first - t0)})
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                now = time.perf_counter()
                if ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"):
                    if first is None:
                        first = now
                    else:
                        raw["gaps"].append(now - last)
                    last = now
                if ev.get("usage"):
                    raw["tokens"] += ev["usage"]["completion_tokens"]
        if first is not None:
            raw["ttfts"].append(first - t0)
        raw["latencies"].append(time.perf_counter() - t0)

    async def client(i: int):
        for k in range(per_client):
            await one(texts[(i * per_client + k) % len(texts)], models[i % len(models)] if models else None)

    await asyncio.gather(*(client(i) for i in clients))


def _headers(token: str | None, trace: bool) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if trace:
        headers["x-orchestrator-trace"] = "1"
    return headers


def _summary(raw: dict, concurrency: int, per_client: int, wall: float, trace: bool) -> dict:
    tokens, errors = raw["tokens"], raw["errors"]
    return {"concurrency": concurrency, "requests": concurrency * per_client, "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2), "errors": errors,
            "error_codes": raw["error_codes"],
            "ttft_p50_s": pct(raw["ttfts"], 0.5), "ttft_p99_s": pct(raw["ttfts"], 0.99),
            "latency_p50_s": pct(raw["latencies"], 0.5), "latency_p99_s": pct(raw["latencies"], 0.99),
            "stream_gap_p50_s": pct(raw["gaps"], 0.5), "stream_gap_p99_s": pct(raw["gaps"], 0.99),
            "mean_tokens_per_request": round(tokens / max(1, concurrency * per_client - errors), 1)} | (
        {"hops": hop_times(raw["traces"]), "traced": len(raw["traces"])} if trace else {})


async def drive(url: str, concurrency: int, per_client: int, max_tokens: int, texts: list[str],
                models: list[str | None] | None = None, token: str | None = None, trace: bool = False) -> dict:
    """``concurrency`` clients in this process over one new connection pool, each sending ``per_client`` requests
    one after the other (client i asks model ``models[i % len(models)]``); generated tokens/s over the wall time,
    TTFT, latency, errors. ``trace``: each request asks for the server's hop times, and the result gains ``hops``
    (``hop_times``). :class:`ClientPool` spreads the clients over processes that keep their connections."""
    import httpx

    raw = _raw()
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as h:
        t0 = time.perf_counter()
        await _run(h, url, list(range(concurrency)), per_client, max_tokens, texts, models, _headers(token, trace),
                   raw)
        wall = time.perf_counter() - t0
    return _summary(raw, concurrency, per_client, wall, trace)


def _worker(conn) -> None:
    """A ClientPool process: one connection pool for its life; each job runs its share of a pass's clients from
    the pass's common start time and sends back what they saw."""
    import httpx

    async def main():
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None,
                                                                       max_keepalive_connections=None)) as h:
            while (job := await asyncio.to_thread(conn.recv)) is not None:
                raw = _raw()
                await asyncio.sleep(max(0.0, job["start_at"] - time.time()))
                start = time.time()
                try:
                    await _run(h, job["url"], job["clients"], job["per_client"], job["max_tokens"], job["texts"],
                               job["models"], job["headers"], raw)
                except Exception as e:  # noqa: BLE001 (the pass fails in the caller, with this process's reason)
                    conn.send({"failed": f"{type(e).__name__}: {e}"})
                    continue
                conn.send(raw | {"start": start, "end": time.time()})

    asyncio.run(main())


class ClientPool:
    """Closed-loop clients spread over ``procs`` processes (client i in process i mod procs), each process keeping
    its connections open from one pass to the next, as a user's client keeps its own. One Python process sending
    64 requests in a burst and parsing 64 streams' events delays them itself: against a server that does no work
    (bench/client_check.py, 2 cores) it got 81% of the tokens/s a perfect client would see, TTFT p99 0.41 s; four
    processes of 16 got 96%, 0.05 s."""

    def __init__(self, procs: int):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.workers = [], []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            worker = ctx.Process(target=_worker, args=(child,), daemon=True)
            worker.start()
            self.conns.append(parent)
            self.workers.append(worker)

    def drive(self, url: str, concurrency: int, per_client: int, max_tokens: int, texts: list[str],
              models: list[str | None] | None = None, token: str | None = None, trace: bool = False) -> dict:
        """As :func:`drive`; the wall time runs from the pass's common start to its last client's end."""
        start_at = time.time() + 0.2  # every process starts its clients together
        n = len(self.conns)
        busy = [(conn, list(range(k, concurrency, n))) for k, conn in enumerate(self.conns) if k < concurrency]
        for conn, clients in busy:
            conn.send({"url": url, "clients": clients, "per_client": per_client, "max_tokens": max_tokens,
                       "texts": texts, "models": models, "headers": _headers(token, trace), "start_at": start_at})
        parts = [conn.recv() for conn, _ in busy]
        failed = [p["failed"] for p in parts if "failed" in p]
        if failed:
            raise RuntimeError(f"a client process failed: {failed[0]}")
        raw = _raw()
        for part in parts:
            for key in ("ttfts", "latencies", "gaps", "traces"):
                raw[key] += part[key]
            raw["tokens"] += part["tokens"]
            raw["errors"] += part["errors"]
            for key, count in part["error_codes"].items():
                raw["error_codes"][key] = raw["error_codes"].get(key, 0) + count
        wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
        return _summary(raw, concurrency, per_client, wall, trace) | {"client_procs": len(busy)}

    def close(self) -> None:
        for conn, worker in zip(self.conns, self.workers, strict=True):
            conn.send(None)
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _null_serve(conn, events: int, interval: float) -> None:
    """NullServer's process: HTTP/1.1 keep-alive on an ephemeral port (sent back over ``conn``)."""
    counts = {"connections": 0, "requests": 0}

    def chunked(text: str) -> bytes:
        data = text.encode()
        return b"%x\r\n%s\r\n" % (len(data), data)

    async def handle(reader, writer):
        chatted = False  # connections are counted once they carry a chat request
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                arrived = time.time()
                lines = head.split(b"\r\n")
                size = next((int(v) for k, _, v in (x.partition(b":") for x in lines[1:])
                             if k.strip().lower() == b"content-length"), 0)
                body = await reader.readexactly(size)
                if lines[0].split()[1] == b"/counts":
                    data = json.dumps(counts).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(data), data))
                    await writer.drain()
                    continue
                counts["requests"] += 1
                counts["connections"] += not chatted
                chatted = True
                if json.loads(body).get("model") == "busy":
                    data = b'{"error": "at capacity"}'
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
                    await writer.drain()
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": " w"},
                                                                         "finish_reason": None}]}
                for _ in range(events):
                    writer.write(chunked(f"data: {json.dumps(chunk)}\n\n"))
                    await writer.drain()
                    await asyncio.sleep(interval)
                usage = {"choices": [], "usage": {"completion_tokens": events}}
                writer.write(chunked(f"data: {json.dumps(usage)}\n\n") + chunked(
                    f": trace {json.dumps({'gateway_in': arrived})}\n\n") + chunked("data: [DONE]\n\n") + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        conn.send(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class NullServer:
    """A chat server that does no work, in a process of its own: each request to ``/v1/chat/completions`` gets
    ``events`` one-token chunks ``interval`` seconds apart, its usage, a ``: trace`` with its arrival time, and
    [DONE] (a 503 for model "busy"); ``GET /counts``: chat requests so far, and the connections they came over. What clients measure
    against it is their own cost."""

    def __init__(self, events: int = 16, interval: float = 0.0):
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_null_serve, args=(child, events, interval), daemon=True)
        self.process.start()
        self.url = parent.recv()

    def counts(self) -> dict[str, int]:
        import httpx

        return httpx.get(f"{self.url}/counts", timeout=30).json()

    def stop(self) -> None:
        self.process.kill()
        self.process.join(timeout=30)

    def __enter__(self) -> NullServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def client_procs(concurrency: int, per_process: int = 16) -> int:
    """Processes for ``concurrency`` clients: one per ``per_process`` clients."""
    return max(1, -(-concurrency // per_process))


@contextlib.contextmanager
def passes(concurrency: int, procs: int | None = None):
    """A function running one pass, with :func:`drive`'s arguments: over a :class:`ClientPool` of ``procs``
    processes (unset: :func:`client_procs`), or with 0 in this process over a new connection pool per pass."""
    procs = client_procs(concurrency) if procs is None else procs
    if not procs:
        yield lambda *args, **kw: asyncio.run(drive(*args, **kw)) | {"client_procs": 0}
        return
    with ClientPool(procs) as pool:
        yield pool.drive


def level(url: str, concurrency: int, per_client: int, max_tokens: int, prompt_tokens: int, seed: int,
          models: list[str | None] | None = None, prefix: str = "", procs: int | None = None) -> dict:
    """A warm-up pass (one request per client, not counted), then the measured pass (clients as :func:`passes`)."""
    with passes(concurrency, procs) as run:
        run(url, concurrency, 1, max_tokens, prompts(concurrency, prompt_tokens, seed + 1000, prefix), models)
        texts = prompts(concurrency * per_client, prompt_tokens, seed, prefix)
        return run(url, concurrency, per_client, max_tokens, texts, models)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0
