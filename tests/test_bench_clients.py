"""The serving benches' clients (bench/clients.py) against its NullServer, a real HTTP server on 127.0.0.1 that
streams chat chunks: clients spread over processes count every token, error and trace as one process does, and
keep their connections from one pass to the next."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import clients  # noqa: E402

EVENTS = 5  # chunks of one answer, one token each


@pytest.fixture()
def server():
    with clients.NullServer(EVENTS, 0.002) as srv:
        yield srv


def test_clients_over_processes_count_what_one_process_counts_and_keep_their_connections(server):
    texts = clients.prompts(8, 20)
    alone = asyncio.run(clients.drive(server.url, 4, 2, 16, texts, trace=True))
    assert server.counts() == {"connections": 4, "requests": 8}
    with clients.ClientPool(2) as pool:
        passes = [pool.drive(server.url, 4, 2, 16, texts, trace=True) for _ in range(2)]
        # the pool's second pass reuses its first pass's connections
        assert server.counts() == {"connections": 4 + 4, "requests": 8 + 16}
        mixed = pool.drive(server.url, 4, 1, 16, texts, models=["m", "busy"])  # clients 1 and 3 get a 503
    for r in (alone, *passes):
        assert r["tokens"] == 4 * 2 * EVENTS and r["errors"] == 0 and r["traced"] == 8
        assert r["hops"]["client -> gateway"]["p50_ms"] is not None and r["wall_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["latency_p50_s"]
    assert passes[0]["client_procs"] == 2
    assert mixed["tokens"] == 2 * EVENTS and mixed["errors"] == 2
    assert mixed["error_codes"] == {'503 {"error": "at capacity"}': 2}


def test_a_pass_that_cannot_connect_fails_with_the_reason_and_the_pool_goes_on(server):
    texts = clients.prompts(2, 10)
    with clients.ClientPool(2) as pool:
        with pytest.raises(RuntimeError, match="a client process failed: ConnectError"):
            pool.drive("http://127.0.0.1:9", 2, 1, 8, texts)  # nothing listens on port 9
        assert pool.drive(server.url, 2, 1, 8, texts)["tokens"] == 2 * EVENTS


def test_client_processes_one_per_sixteen_clients():
    assert [clients.client_procs(c) for c in (1, 16, 17, 64, 128)] == [1, 1, 2, 4, 8]
