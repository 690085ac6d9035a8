"""The HTTP ingress: OpenAI-compatible routes, the entities route, auth, validation, back-pressure answers,
and the chat page. It forwards to the model deployments' handles and knows nothing of torch."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from serve.schemas import ChatRequest, CompletionRequest, EntitiesRequest, SamplingRequest

STATIC = Path(__file__).resolve().parent / "static"
# A streaming request with this header gets, before [DONE], an SSE comment ``: trace {...}``: the wall-clock times
# (time.time()) at which it passed each hop on its way to the engine and its first token on the way back.
TRACE_HEADER = "x-orchestrator-trace"
READY_RECHECK_S = 5.0  # /healthz asks Serve for the replicas' states again after this long
REPLICA_LOST = (RayActorError, ActorUnavailableError)  # a replica that died (or was lost) mid-request


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param}})


async def _bad_request(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    msg = first["msg"].removeprefix("Value error, ")
    return _error(400, f"{loc}: {msg}", loc)


class Gateway:
    """Routes requests to the model deployments; auth, validation and back-pressure answers live here."""

    def __init__(self, routes: dict[str, Any], tasks: dict[str, str], multiplexed: dict[str, str],
                 auth_token_env: str | None = None):
        self.routes, self.tasks, self.multiplexed = routes, tasks, multiplexed
        self.token = os.environ.get(auth_token_env) if auth_token_env else None
        if auth_token_env and not self.token:
            raise RuntimeError(f"auth_token_env={auth_token_env}: that environment variable is not set")
        self.created = int(time.time())
        self.ready_at = -1e9  # when /healthz last found every model deployment running
        self.streams: dict[str, Any] = {}  # served name -> its streaming method handle

    def _auth(self, request: Request):
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if self.token and not hmac.compare_digest(given, f"Bearer {self.token}".encode()):  # constant time
            return _error(401, "missing or wrong bearer token", kind="authentication_error")
        return None

    def _pick(self, name: str | None, task: str):
        names = [n for n, t in self.tasks.items() if t == task]
        if not names:
            return None, _error(404, f"no {task} model is served here", "model")
        if name is None:
            name = names[0]
        if name not in names:
            return None, _error(404, f"model {name!r} is not served here; try one of {names}", "model")
        handle = self.routes[name]
        if name in self.multiplexed:
            handle = handle.options(multiplexed_model_id=self.multiplexed[name])
        return (name, handle), None

    def _route(self, request: Request, name: str | None, task: str):
        """((name, handle), None) for an authorized request to a served model of ``task``, else (None, error)."""
        if (denied := self._auth(request)) is not None:
            return None, denied
        return self._pick(name, task)

    @staticmethod
    def _busy():
        return _error(503, "the server is at capacity; retry shortly", kind="overloaded")

    async def _text(self, request: Request, body: SamplingRequest, kind: str):
        picked, err = self._route(request, body.model, "causal_lm")
        if err:
            return err
        name, handle = picked
        req = body.model_dump(exclude={"model", "stream", "stream_options"})
        if body.stream and TRACE_HEADER in request.headers:
            req["_trace"] = {"gateway_in": time.time()}
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(handle, req, rid, name, kind, usage)
        res, err = await self._call(lambda: handle.complete.remote(req))
        if err:
            return err
        if "error" in res:
            return _error(res["status"], res["error"], res.get("param"))
        usage = {"prompt_tokens": res["prompt_tokens"], "completion_tokens": res["completion_tokens"],
                 "total_tokens": res["prompt_tokens"] + res["completion_tokens"]}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": res["text"]},
                      "finish_reason": res["finish_reason"]}
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": name,
                    "choices": [choice], "usage": usage}
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "text": res["text"], "finish_reason": res["finish_reason"],
                             "logprobs": None}], "usage": usage}

    async def _call(self, send):
        """(result, None) of ``await send()``, else (None, error response): 503 when the replicas are full, and
        when a replica dies while answering, after one retry on another replica (nothing was sent yet)."""
        for attempt in (1, 2):
            try:
                return await send(), None
            except BackPressureError:
                return None, self._busy()
            except REPLICA_LOST:
                if attempt == 2:
                    return None, _error(503, "the model's replica failed while answering; retry shortly",
                                        kind="unavailable")

    async def _stream(self, handle, req: dict[str, Any], rid: str, name: str, kind: str, usage: bool = False):
        method = self.streams.get(name)
        if method is None:  # a handle per call costs the event loop; one per served model is enough
            method = self.streams[name] = handle.options(stream=True).stream

        async def start():
            if "_trace" in req:
                req["_trace"]["gateway_call"] = time.time()
            gen = method.remote(req)
            try:
                return gen, await gen.__anext__()
            except StopAsyncIteration:
                return gen, {"finish_reason": "stop"}

        started, err = await self._call(start)
        if err:
            return err
        gen, first = started
        trace = first.pop("_trace", None)
        if trace is not None:
            trace["gateway_first"] = time.time()
        if "error" in first:
            return _error(first["status"], first["error"], first.get("param"))
        created = int(time.time())

        def chunk(item: dict[str, Any]) -> str:
            if kind == "chat":
                delta = {"content": item["text"]} if "text" in item else {}
                choice = {"index": 0, "delta": delta, "finish_reason": item.get("finish_reason")}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": item.get("text", ""), "finish_reason": item.get("finish_reason"),
                          "logprobs": None}
                obj = "text_completion"
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": name,
                                          "choices": [choice]}) + "\n\n"

        async def events():
            if kind == "chat":
                yield chunk({"text": ""}).replace('"delta": {"content": ""}', '"delta": {"role": "assistant"}')
            yield chunk(first)
            last = first
            try:
                async for item in gen:
                    yield chunk(item)
                    last = item
            except REPLICA_LOST:  # the answer was partly sent: end the stream with an error event, never hang
                yield "data: " + json.dumps({"error": {"message": "the model's replica failed while answering",
                                                       "type": "unavailable", "code": 503}}) + "\n\n"
                return
            finally:  # a client gone mid-stream: a replica's own generator (fused gateway) frees its sequence now
                if (close := getattr(gen, "aclose", None)) is not None:
                    await close()
            if usage and "completion_tokens" in last:  # OpenAI's stream_options.include_usage: a last chunk
                counts = {k: last[k] for k in ("prompt_tokens", "completion_tokens")}
                yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk" if kind == "chat"
                                             else "text_completion", "created": created, "model": name,
                                             "choices": [], "usage": {**counts, "total_tokens": sum(counts.values())}}
                                            ) + "\n\n"
            if trace is not None:
                yield f": trace {json.dumps(trace)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def chat(self, request: Request, body: ChatRequest):
        return await self._text(request, body, "chat")

    async def completions(self, request: Request, body: CompletionRequest):
        return await self._text(request, body, "completion")

    async def models(self, request: Request):
        if (denied := self._auth(request)) is not None:
            return denied
        return {"object": "list", "data": [{"id": n, "object": "model", "created": self.created,
                                            "owned_by": "orchestrator", "task": t} for n, t in self.tasks.items()]}

    async def entities(self, request: Request, body: EntitiesRequest):
        picked, err = self._route(request, body.model, "token_classification")
        if err:
            return err
        name, handle = picked
        texts = [body.text] if body.text is not None else body.texts
        found, err = await self._call(lambda: asyncio.gather(*(handle.extract.remote(t) for t in texts)))
        if err:
            return err
        if body.text is not None:
            return {"model": name, "entities": found[0]}
        return {"model": name, "results": [{"entities": f} for f in found]}

    async def healthz(self):
        """200 once every model deployment has a running replica (one still loading is not ready), else 503."""
        if time.monotonic() - self.ready_at > READY_RECHECK_S:
            waiting = await asyncio.to_thread(self._loading)
            if waiting:
                return JSONResponse(status_code=503, content={"status": "loading", "waiting_for": waiting})
            self.ready_at = time.monotonic()
        return {"status": "ok", "models": self.tasks}

    def _loading(self) -> list[str]:
        """Names of the served models whose deployment has no running replica yet."""
        status = serve.status()
        waiting = []
        for name, handle in self.routes.items():
            app = status.applications.get(handle.app_name)
            dep = app.deployments.get(handle.deployment_name) if app else None
            running = sum(n for state, n in (dep.replica_states if dep else {}).items()
                          if str(getattr(state, "value", state)) == "RUNNING")
            if not running:
                waiting.append(name)
        return waiting

    async def stats(self, request: Request, window_s: float | None = Query(None, gt=0)):
        """Each model deployment's own figures (the engine's KV blocks, sequences, prefix-cache hits, adapters;
        ``?window_s=N``: first-token times over the last N seconds)."""
        if (denied := self._auth(request)) is not None:
            return denied
        seen, out = set(), {}
        for name, handle in self.routes.items():
            key = (handle.app_name, handle.deployment_name)
            if key in seen:
                continue
            seen.add(key)
            res, err = await self._call(lambda h=handle: h.stats.remote(window_s))
            out[name] = res if err is None else {"error": "busy"}
        return {"models": out}

    async def page(self):
        return HTMLResponse((STATIC / "chat.html").read_text(encoding="utf-8"))


def make_api() -> FastAPI:
    """A FastAPI app with the routes on Gateway's methods (one per ingress class: Serve binds them to it)."""
    api = FastAPI(title="orchestrator", description="OpenAI-compatible generation and entity extraction")
    api.add_exception_handler(RequestValidationError, _bad_request)
    api.post("/v1/chat/completions")(Gateway.chat)
    api.post("/v1/completions")(Gateway.completions)
    api.get("/v1/models")(Gateway.models)
    api.post("/v1/entities")(Gateway.entities)
    api.get("/healthz")(Gateway.healthz)
    api.get("/v1/stats")(Gateway.stats)
    api.get("/", response_class=HTMLResponse)(Gateway.page)
    return api


api = make_api()
# The gateway only validates and forwards (the models' replicas do the work): it reserves no CPU, so a
# small machine's cores go to the model replicas.
GatewayDeployment = serve.deployment(name="Gateway", max_ongoing_requests=256,
                                     ray_actor_options={"num_cpus": 0})(serve.ingress(api)(Gateway))
