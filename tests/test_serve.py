"""Ray Serve on 127.0.0.1 with real HTTP: OpenAI client (completion + stream), entities from a merged
BC5CDR model, 4xx on bad requests, 401 without the token, 503 under a burst, autoscaling up and down."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from .conftest import FIXTURES, ROOT, SERVE_TOKEN_ENV
from .test_bad_inputs import _adapter_on as adapter_on

PORT = 8765
URL = f"http://127.0.0.1:{PORT}"
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _spec(name, task, path, **kw):
    return {"name": name, "task": task, "path": str(path), "num_cpus": 0, "max_input_length": 128,
            "max_tokens_limit": 64, **kw}


@pytest.fixture(scope="module")
def ner_merged(tmp_path_factory):
    """The fixture BC5CDR adapter (see tests/fixtures/README.md) merged into the packaged MiniLM."""
    from orchestrator.artifacts.merge import merge_adapter
    from orchestrator.core.config import load_config

    from .conftest import ROOT

    cfg = load_config(ROOT / "configs/medical-ner-tiny.yaml")
    out = tmp_path_factory.mktemp("ner") / "merged"
    rows = [{"tokens": "Cisplatin - induced nephrotoxicity in rats .".split()},
            {"tokens": "Haloperidol can cause tardive dyskinesia .".split()}]
    merge_adapter(cfg, FIXTURES / "ner-adapter", out, rows, compare=False)
    return out


@pytest.fixture(scope="module")
def app(ray_local, tiny_model_dir, ner_merged, random_adapter, tmp_path_factory):
    from ray import serve

    from orchestrator.deployment.launcher import start

    from .conftest import make_random_adapter

    other = make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter-b"), seed=1)
    adapters = {"name": "loras", "task": "causal_lm", "base": str(tiny_model_dir), "num_cpus": 0,
                "adapters": {"lora-a": str(random_adapter), "lora-b": str(other)}}
    args = {"models": [_spec("constitution-qa", "causal_lm", tiny_model_dir, max_batch_size=8,
                             batch_wait_timeout_s=0.05, max_ongoing_requests=16, max_queued_requests=64),
                       _spec("medical-ner", "token_classification", ner_merged), adapters],
            "auth_token_env": SERVE_TOKEN_ENV, "gateway_replicas": 2}
    start(args, "127.0.0.1", PORT)
    yield URL
    serve.shutdown()


def test_every_replica_runs_on_serves_lean_path(app):
    """serve.fast_path (on by default): the live gateways and model replicas' processes carry Ray Serve's gRPC and
    same-loop settings (read from their environments, as Serve reads them when it starts there)."""
    from ray.util.state import list_actors

    from serve.app import FAST_PATH

    replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                if a.class_name.startswith("ServeReplica:orchestrator:")]
    names = [a.class_name.split(":")[-1] for a in replicas]
    assert {"Gateway", "TextGenerator-constitution-qa", "EntityExtractor-medical-ner"} <= set(names), names
    assert names.count("Gateway") == 2, names  # serve.gateway_replicas: every test here goes through two gateways
    for a in replicas:
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{a.pid}/environ").read_text().split("\0") if "=" in kv)
        assert {k: env.get(k) for k in FAST_PATH} == FAST_PATH, a.class_name


def test_openai_client_completion_stream_and_models(app):
    from openai import OpenAI

    client = OpenAI(base_url=f"{app}/v1", api_key=TOKEN)
    ids = {m.id for m in client.models.list().data}
    assert ids == {"constitution-qa", "medical-ner", "loras", "lora-a", "lora-b"}  # "loras": the adapters' base
    r = client.chat.completions.create(model="constitution-qa", max_tokens=12, temperature=0,
                                       messages=[{"role": "user", "content": "What does Article 16 provide?"}])
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    pieces = []
    for chunk in client.chat.completions.create(model="constitution-qa", max_tokens=12, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": "What does Article 16 provide?"}]):
        pieces.append(chunk.choices[0])
    text = "".join(c.delta.content or "" for c in pieces)
    assert pieces[-1].finish_reason in ("stop", "length") and text == r.choices[0].message.content
    c = client.completions.create(model="constitution-qa", prompt="The Constitution of Nepal", max_tokens=8,
                                  temperature=0.8, top_p=0.9, extra_body={"repetition_penalty": 1.2})
    assert c.object == "text_completion" and c.usage.completion_tokens <= 8
    with httpx.Client() as h:
        assert h.get(f"{app}/healthz").json()["status"] == "ok"
        page = h.get(f"{app}/")
        assert page.status_code == 200 and "<textarea" in page.text


TRACE_ORDER = ("gateway_in", "gateway_call", "replica_in", "engine_submit", "engine_first", "replica_first",
               "gateway_first")


def check_traced_stream(url: str, model: str, headers: dict[str, str] | None = None) -> None:
    """A stream asked with x-orchestrator-trace ends with one ``: trace`` comment before [DONE] whose hop times lie
    in order between the client's send and its last byte; the same request without the header gets none."""
    body = {"model": model, "max_tokens": 8, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "What does Article 16 provide?"}]}
    with httpx.Client(timeout=60) as h:
        sent = time.time()
        r = h.post(f"{url}/v1/chat/completions", json=body, headers={**(headers or {}), "x-orchestrator-trace": "1"})
        done = time.time()
        plain = h.post(f"{url}/v1/chat/completions", json=body, headers=headers or {})
    assert r.status_code == 200 and plain.status_code == 200, (r.text, plain.text)
    lines = [ln for ln in r.text.splitlines() if ln]
    traces = [json.loads(ln[len(": trace "):]) for ln in lines if ln.startswith(": trace ")]
    assert len(traces) == 1 and lines[-2].startswith(": trace ") and lines[-1] == "data: [DONE]", lines[-3:]
    times = [sent, *(traces[0][k] for k in TRACE_ORDER), done]
    hops = dict(zip(TRACE_ORDER, times[1:-1], strict=True))
    assert all(b - a > -1e-3 for a, b in zip(times, times[1:], strict=False)), hops
    assert ": trace" not in plain.text
    text = [json.loads(ln[6:])["choices"][0]["delta"].get("content", "") for ln in lines
            if ln.startswith("data: {")]
    assert "".join(text) == "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content", "")
                                    for ln in plain.text.splitlines() if ln.startswith("data: {"))


def test_a_traced_stream_reports_each_hop_to_its_first_token(app):
    check_traced_stream(app, "constitution-qa", AUTH)


def test_lora_adapters_multiplexed_on_one_base(app):
    from openai import OpenAI

    client = OpenAI(base_url=f"{app}/v1", api_key=TOKEN)
    ask = {"messages": [{"role": "user", "content": "Which article deals with citizenship?"}], "max_tokens": 10,
           "temperature": 0}
    out = {m: client.chat.completions.create(model=m, **ask).choices[0].message.content
           for m in ("lora-a", "lora-b", "constitution-qa", "lora-a")}
    assert out["lora-a"] != out["lora-b"], "each adapter changes the function differently"
    again = client.chat.completions.create(model="lora-a", **ask).choices[0].message.content
    assert again == out["lora-a"], "switching adapters back and forth is deterministic"
    stream = client.chat.completions.create(model="lora-b", stream=True, **ask)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == out["lora-b"]


def test_entities_finds_chemical_and_disease(app):
    text = "Cisplatin-induced nephrotoxicity was seen in rats."
    r = httpx.post(f"{app}/v1/entities", json={"text": text}, headers=AUTH, timeout=60)
    assert r.status_code == 200
    ents = r.json()["entities"]
    found = {(e["type"], e["text"]) for e in ents}
    assert ("Chemical", "Cisplatin") in found and ("Disease", "nephrotoxicity") in found, ents
    for e in ents:
        assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
    r = httpx.post(f"{app}/v1/entities", json={"texts": [text, "Haloperidol caused tardive dyskinesia."]},
                   headers=AUTH, timeout=60)
    assert [len(x["entities"]) > 0 for x in r.json()["results"]] == [True, True]


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/chat/completions", {"model": "constitution-qa"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "law " * 400}], "max_tokens": 8}, 400,
     "prompt is"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/chat/completions", {"model": "gpt-7", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-7"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 8, "stream": True, "model": "medical-ner"}, 404, "medical-ner"),
    ("/v1/entities", {}, 400, "exactly one of text or texts"),
    ("/v1/entities", {"text": 5}, 400, "text"),
    # a lone surrogate, as JSON allows it: a 400 naming the field, not a 500 from the tokenizer
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     "messages.0.content: invalid Unicode"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["\\udfff"]}', 400, "stop"),
    ("/v1/entities", b'{"texts": ["ok", "\\ud800"]}', 400, "texts"),
    # path-like model names are names that are not served, never paths opened on the replica
    ("/v1/chat/completions", {"model": "../../etc/passwd", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "../../etc/passwd"),
    ("/v1/completions", {"model": "/tmp/constitution-qa", "prompt": "x"}, 404, "/tmp/constitution-qa"),
    ("/v1/completions", {"prompt": "law " * 250_000, "max_tokens": 8}, 400, "prompt is"),  # a 1 MB prompt
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, "JSON"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/entities", {"texts": "one text"}, 400, "texts"),
])
def test_bad_requests_get_4xx_with_a_message(app, path, body, status, needle):
    if isinstance(body, bytes):  # sent as written (an encoder would refuse a lone surrogate)
        r = httpx.post(f"{app}{path}", content=body, headers={**AUTH, "content-type": "application/json"},
                       timeout=60)
    else:
        r = httpx.post(f"{app}{path}", json=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_bearer_token_required(app):
    r = httpx.post(f"{app}/v1/entities", json={"text": "aspirin"}, timeout=30)
    assert r.status_code == 401 and "token" in r.json()["error"]["message"]
    assert httpx.get(f"{app}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_batching_groups_concurrent_requests(app):
    from ray import serve

    async def burst():
        async with httpx.AsyncClient(timeout=120) as h:
            body = {"messages": [{"role": "user", "content": "Which article deals with citizenship?"}],
                    "max_tokens": 8, "temperature": 0}
            return await asyncio.gather(*(h.post(f"{app}/v1/chat/completions", json=body, headers=AUTH)
                                          for _ in range(8)))

    rs = asyncio.run(burst())
    assert all(r.status_code == 200 for r in rs)
    assert len({r.json()["choices"][0]["message"]["content"] for r in rs}) == 1  # greedy: same answer
    handle = serve.get_deployment_handle("TextGenerator-constitution-qa", app_name="orchestrator")
    assert max(handle.batch_sizes.remote().result()) > 1


@pytest.fixture()
def small_app(ray_local, tiny_model_dir):
    """A second application with its own limits (route /small): one request at a time, one queued."""
    from ray import serve

    from serve.app import build_app

    def run(**kw):
        args = {"models": [_spec("qa", "causal_lm", tiny_model_dir, **kw)]}
        serve.run(build_app(args), name="small", route_prefix="/small")
        return f"{URL}/small"

    yield run
    serve.delete("small")


def test_overload_answers_503_and_server_stays_up(app, small_app):
    url = small_app(max_ongoing_requests=1, max_queued_requests=1, max_batch_size=1)

    async def burst():
        async with httpx.AsyncClient(timeout=120) as h:
            body = {"prompt": "The Constitution", "max_tokens": 48, "temperature": 0}
            return await asyncio.gather(*(h.post(f"{url}/v1/completions", json=body) for _ in range(12)))

    codes = [r.status_code for r in asyncio.run(burst())]
    assert codes.count(503) >= 1 and codes.count(200) >= 1 and set(codes) <= {200, 503}, codes
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200


def test_autoscaling_up_under_load_and_back_down(app, small_app):
    from ray import serve

    url = small_app(max_ongoing_requests=2, max_queued_requests=64, max_batch_size=1,
                    autoscaling={"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
                                 "target_ongoing_requests": 1, "upscale_delay_s": 1, "downscale_delay_s": 4,
                                 "look_back_period_s": 2, "metrics_interval_s": 0.5})

    def replicas() -> int:
        """Replicas the deployment has (running or starting: a new replica may take a while to load)."""
        dep = serve.status().applications["small"].deployments["TextGenerator-qa"]
        return sum(n for state, n in dep.replica_states.items() if str(state).split(".")[-1] in ("RUNNING", "STARTING"))

    assert replicas() == 1
    peak, stop = 1, time.monotonic() + 90

    async def load():
        nonlocal peak
        async with httpx.AsyncClient(timeout=120) as h:
            async def user():
                while time.monotonic() < stop and peak < 2:
                    await h.post(f"{url}/v1/completions", json={"prompt": "Article", "max_tokens": 32})

            async def watch():
                nonlocal peak
                while time.monotonic() < stop and peak < 2:
                    peak = max(peak, replicas())
                    await asyncio.sleep(0.5)

            await asyncio.gather(watch(), *(user() for _ in range(6)))

    asyncio.run(load())
    assert peak >= 2, "sustained load should add replicas"
    deadline = time.monotonic() + 120
    while replicas() > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert replicas() == 1, "idle: back to min_replicas"


def test_replica_killed_mid_request_retries_or_503_never_hangs(app, small_app):
    """A replica's process SIGKILLed while it answers: its requests are retried on the other replica (or get
    a 503), none hangs or gets a 500, and Serve brings the replica back."""
    import os
    import signal

    from ray import serve
    from ray.util.state import list_actors

    url = small_app(max_ongoing_requests=4, max_queued_requests=64, max_batch_size=4,
                    autoscaling={"min_replicas": 2, "max_replicas": 2})

    def running() -> int:
        return serve.status().applications["small"].deployments["TextGenerator-qa"].replica_states.get("RUNNING", 0)

    pids = [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
            if (a.class_name or "") == "ServeReplica:small:TextGenerator-qa"]
    assert len(pids) == 2 and running() == 2

    log, killed_at = [], []

    async def load():
        async with httpx.AsyncClient(timeout=60) as h:
            body = {"prompt": "The Constitution of Nepal", "max_tokens": 64, "temperature": 0}

            async def user():  # closed loop until 3 s after the kill
                while not killed_at or time.monotonic() < killed_at[0] + 3:
                    t0 = time.monotonic()
                    try:
                        code = (await h.post(f"{url}/v1/completions", json=body)).status_code
                    except httpx.HTTPError as e:
                        code = type(e).__name__
                    log.append((t0, time.monotonic(), code))

            async def kill():
                await asyncio.sleep(2)
                killed_at.append(time.monotonic())
                os.kill(pids[0], signal.SIGKILL)

            await asyncio.gather(kill(), *(user() for _ in range(8)))

    asyncio.run(load())
    in_flight = [code for t0, t1, code in log if t0 < killed_at[0] < t1]
    assert len(in_flight) >= 4, "requests were in flight on both replicas when one died"
    codes = [code for _, _, code in log]
    assert set(codes) <= {200, 503}, codes  # retried, or a clean 503: no 500, no timeout
    deadline = time.monotonic() + 90
    while running() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running() == 2, "Serve replaces the dead replica"
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200


def test_chat_page_streams_an_answer_in_chromium(app):
    """The chat page in headless Chromium: pick the model, ask, watch the streamed answer arrive."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the README's install command installs Debian's chromium for this test"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(f"{app}/")
        page.fill("#token", TOKEN)
        page.evaluate("loadModels()")
        page.wait_for_function("document.querySelectorAll('#model option').length >= 3")
        options = page.eval_on_selector_all("#model option", "els => els.map(e => e.textContent)")
        assert "constitution-qa" in options and "medical-ner" not in options
        page.select_option("#model", "constitution-qa")
        page.fill("#max_tokens", "12")
        page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
        assert page.text_content("#tval") == "0"
        page.fill("#question", "What does Article 16 provide?")
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
        answer = page.text_content(".a")
        browser.close()
    expected = httpx.post(f"{app}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "constitution-qa", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "What does Article 16 provide?"}]}).json()
    assert answer and answer == expected["choices"][0]["message"]["content"]


def test_serve_config_file_is_valid_for_serve_deploy(tiny_model_dir, tmp_path):
    import shutil

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from orchestrator.core.config import ConfigError, load_config
    from orchestrator.deployment.launcher import app_args, serve_config
    from serve.app import build_app

    from .conftest import ROOT

    cfg = load_config(ROOT / "configs/constitution-qa-tiny.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="no merged model"):
        app_args([cfg])
    shutil.copytree(tiny_model_dir, cfg.run_dir / "merged")
    args = app_args([cfg])
    doc = yaml.safe_load(serve_config(args, "0.0.0.0", 8000))
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(doc)
    assert schema.applications[0].import_path == "serve.app:build_app"
    assert args["models"][0]["autoscaling"]["max_replicas"] == cfg.serve.autoscaling.max_replicas
    assert build_app(doc["applications"][0]["args"]) is not None


def test_coalescer_merges_batches_handed_in_while_the_model_is_busy():
    """The first batch runs alone; the three that arrive while it runs are merged into calls of at most
    max_size items; every caller gets its own results, in order; a failing call fails its callers and the next one runs."""
    import threading

    from serve.generator import Coalescer

    calls: list[list[int]] = []
    release = threading.Event()

    def fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(5)  # the model is busy with the first batch while the others arrive
        if -1 in items:
            raise ValueError("bad item")
        return [x * 10 for x in items]

    async def main():
        co = Coalescer(fn, max_size=5)
        first = asyncio.create_task(co.submit([1, 2]))
        await asyncio.sleep(0.05)
        later = [asyncio.create_task(co.submit(b)) for b in ([3], [4, 5], [6, 7, 8])]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(first, *later)
        # handed in together, so merged into one call: its error reaches both callers; the next call works
        failed = await asyncio.gather(co.submit([-1]), co.submit([9]), return_exceptions=True)
        assert [type(e) for e in failed] == [ValueError, ValueError]
        return results, await co.submit([9]), co.running

    results, ok, running = asyncio.run(main())
    assert results == [[10, 20], [30], [40, 50], [60, 70, 80]]
    assert calls[:3] == [[1, 2], [3, 4, 5, 6, 7], [8]]  # merged up to max_size, the rest in the next call
    assert ok == [90] and not running


def test_healthz_answers_503_until_every_model_can_serve(app, tiny_model_dir):
    """A replica that takes seconds to load: /healthz is 503 naming it meanwhile (the gateway is up), then 200,
    and a completion is answered at once after the first 200."""
    import threading

    from ray import serve

    from serve.gateway import GatewayDeployment
    from serve.generator import LOAD_DELAY_ENV, TextGenerator
    from serve.schemas import ModelSpec

    spec = ModelSpec.model_validate(_spec("slowqa", "causal_lm", tiny_model_dir)).model_dump()
    dep = serve.deployment(TextGenerator, name="TextGenerator-slowqa").options(
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {LOAD_DELAY_ENV: "8"}}}).bind(spec)
    app = GatewayDeployment.bind({"slowqa": dep}, {"slowqa": "causal_lm"}, {}, None)
    deploying = threading.Thread(target=lambda: serve.run(app, name="slow", route_prefix="/slow"), daemon=True)
    deploying.start()
    seen, deadline = [], time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{URL}/slow/healthz", timeout=10)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            if r.status_code != 404:  # 404: the route is not there yet
                seen.append((r.status_code, r.json()))
            if r.status_code == 200:
                break
            time.sleep(0.3)
        codes = [c for c, _ in seen]
        assert codes and codes[-1] == 200 and 503 in codes, seen
        assert seen[codes.index(503)][1] == {"status": "loading", "waiting_for": ["slowqa"]}
        t0 = time.monotonic()
        r = httpx.post(f"{URL}/slow/v1/completions", json={"prompt": "The Constitution", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and time.monotonic() - t0 < 10
    finally:
        deploying.join(timeout=120)
        serve.delete("slow")


def test_more_adapters_than_slots_are_evicted_and_answer_again_when_asked(ray_local, tiny_model_dir,
                                                                          tmp_path_factory):
    """More adapters than the engine keeps on the device: the least recently used idle one gives its slot up,
    and asked again it is loaded again (off the decode thread) and answers exactly as before; a name not served
    is a 404 naming it; the stats route shows the pool."""
    from ray import serve

    from serve.app import build_app

    from .conftest import make_random_adapter

    keep, names = 2, [f"a{i}" for i in range(4)]
    adapters = {n: str(make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp(n), seed=20 + i))
                for i, n in enumerate(names)}
    spec = {"name": "many", "task": "causal_lm", "base": str(tiny_model_dir), "num_cpus": 0, "adapters": adapters,
            "max_tokens_limit": 16, "max_adapters": keep}
    serve.run(build_app({"models": [spec]}), name="many", route_prefix="/many")
    try:
        def ask(name: str) -> str:
            r = httpx.post(f"{URL}/many/v1/completions", timeout=120,
                           json={"model": name, "prompt": "The Constitution", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        first = {n: ask(n) for n in names}
        assert len(set(first.values())) > 1, "different adapters, different answers"
        stats = httpx.get(f"{URL}/many/v1/stats", timeout=60).json()["models"]["many"]
        assert stats["adapters_loaded"] == names[-keep:] and stats["adapter_slots"] == keep, stats
        assert ask("a0") == first["a0"]  # evicted, loaded again, the same function
        stats = httpx.get(f"{URL}/many/v1/stats", timeout=60).json()["models"]["many"]
        assert stats["adapters_loaded"] == [names[-1], "a0"] and stats["adapter_loads"] == len(names) + 1, stats
        # the engine's own first-token times: the 5 requests above in a long window, none in a window that ended
        # before them (the route checks its query)
        recent = httpx.get(f"{URL}/many/v1/stats?window_s=600", timeout=60).json()["models"]["many"]
        assert 0 < recent["engine_ttft_ms_p50"] <= recent["engine_ttft_ms_p99"] < 60_000, recent
        time.sleep(0.5)
        assert httpx.get(f"{URL}/many/v1/stats?window_s=0.2", timeout=60).json()["models"]["many"][
            "engine_ttft_ms_p50"] is None
        assert httpx.get(f"{URL}/many/v1/stats?window_s=-1", timeout=60).status_code == 400
        r = httpx.post(f"{URL}/many/v1/completions", json={"model": "a9", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 404 and "'a9'" in r.json()["error"]["message"]
    finally:
        serve.delete("many")


def test_serve_given_an_adapter_merges_it_onto_the_base_it_records(ray_local, tmp_path, capsys, random_adapter,
                                                                   tiny_model_dir):
    """`orchestrator serve CONFIG --model ADAPTER`: the adapter is merged first, onto the base its
    adapter_config.json records (not the config's), and the merged model is what gets served."""
    from orchestrator.deployment.launcher import served_model

    adapter = adapter_on(random_adapter, tmp_path / "run" / "adapter", str(tiny_model_dir))
    sets = [f"model.name_or_path={tmp_path / 'other'}", "data.qa.max_articles=12", f"output_dir={tmp_path}"]
    served = served_model(ROOT / "configs/constitution-qa-tiny.yaml", str(adapter), sets)
    out = capsys.readouterr().out
    assert served == str(tmp_path / "run" / "merged") and (tmp_path / "run/merged/config.json").is_file()
    assert "an adapter; merging it into its base first" in out and f"trained on {tiny_model_dir}; using that base" in out
    merged = json.loads((tmp_path / "run/merged/merge.json").read_text())
    assert merged["base"] == str(tiny_model_dir)
    assert served_model(ROOT / "configs/constitution-qa-tiny.yaml", str(tmp_path / "run/merged"), sets) == str(
        tmp_path / "run/merged")  # a merged model is served as it is
