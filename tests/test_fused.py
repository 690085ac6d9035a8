"""``serve.gateway: fused``: one text model's replicas take HTTP themselves (real Serve, real HTTP on 127.0.0.1).
No gateway deployment runs; the OpenAI routes, adapters by ``model``, stats, health and 400s answer as with one;
a client that goes away mid-stream frees its sequence."""

from __future__ import annotations

import time

import httpx
import pytest

PORT = 8767
URL = f"http://127.0.0.1:{PORT}"
ASK = {"messages": [{"role": "user", "content": "Which article deals with citizenship?"}], "max_tokens": 12,
       "temperature": 0}


@pytest.fixture(scope="module")
def fused(ray_local, tiny_model_dir, random_adapter, tmp_path_factory):
    from ray import serve

    from orchestrator.deployment.launcher import start

    from .conftest import make_random_adapter

    other = make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter-b"), seed=1)
    spec = {"name": "qa", "task": "causal_lm", "base": str(tiny_model_dir), "num_cpus": 0, "max_input_length": 128,
            "max_tokens_limit": 600, "max_ongoing_requests": 16,
            "adapters": {"lora-a": str(random_adapter), "lora-b": str(other)}}
    start({"models": [spec], "gateway": "fused"}, "127.0.0.1", PORT)
    yield URL
    serve.shutdown()


def _chat(h: httpx.Client, model: str, stream: bool = False) -> str:
    r = h.post(f"{URL}/v1/chat/completions", json={**ASK, "model": model, "stream": stream}, timeout=60)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["message"]["content"]
    import json

    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])


def test_the_model_replica_is_the_ingress_and_answers_every_route(fused):
    from ray.util.state import list_actors

    names = [a.class_name.split(":")[-1] for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
             if a.class_name.startswith("ServeReplica:orchestrator:")]
    assert names == ["TextGenerator-qa"], names  # no gateway deployment
    with httpx.Client() as h:
        assert h.get(f"{URL}/healthz").json()["status"] == "ok"
        assert {m["id"] for m in h.get(f"{URL}/v1/models").json()["data"]} == {"qa", "lora-a", "lora-b"}
        out = {m: _chat(h, m) for m in ("qa", "lora-a", "lora-b")}
        assert out["lora-a"] != out["lora-b"], "each adapter is applied by the request's model"
        for m in ("qa", "lora-b"):
            assert _chat(h, m, stream=True) == out[m], "streamed text equals the whole completion"
        stats = h.get(f"{URL}/v1/stats").json()["models"]
        assert list(stats) == ["qa"] and stats["qa"]["path"] == "engine"
        bad = h.post(f"{URL}/v1/chat/completions", json={"messages": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        assert h.post(f"{URL}/v1/chat/completions", json={**ASK, "model": "nope"}).status_code == 404


def test_a_traced_stream_reports_each_hop_inside_the_replica(fused):
    from .test_serve import check_traced_stream

    check_traced_stream(fused, "qa")


def test_a_client_gone_mid_stream_frees_its_sequence(fused):
    with httpx.Client(timeout=60) as h:
        whole = h.post(f"{URL}/v1/chat/completions", json={**ASK, "model": "qa", "max_tokens": 600}).json()
        assert whole["usage"]["completion_tokens"] == 600, "left alone, this request runs its 600 tokens"
        before = h.get(f"{URL}/v1/stats").json()["models"]["qa"]["tokens_generated"]
        body = {**ASK, "model": "qa", "max_tokens": 600, "stream": True}
        with h.stream("POST", f"{URL}/v1/chat/completions", json=body) as r:
            next(r.iter_lines())  # the first event, then hang up
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = h.get(f"{URL}/v1/stats").json()["models"]["qa"]
            if st["active"] == 0 and st["waiting"] == 0:
                break
            time.sleep(0.05)
        assert st["active"] == 0 and st["waiting"] == 0, st
        assert st["tokens_generated"] - before < 600, "the sequence stopped before its 600 tokens"
