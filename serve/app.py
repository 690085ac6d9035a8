"""The Ray Serve application: merged (or LoRA-multiplexed) models behind one FastAPI ingress.

* ``TextGenerator``: a causal LM; dynamic batching (``@serve.batch``) for non-streamed requests, a
  token streamer for ``stream=true``; optionally several LoRA adapters on one base (``@serve.multiplexed``,
  chosen by the request's ``model``).
* ``EntityExtractor``: a token-classification model; batched; BIO tags -> character spans.
* ``Gateway``: the FastAPI ingress. OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/models``; ``/v1/entities``; ``/healthz``; a chat page at ``/``. Bad requests get 4xx with a
  message naming the field; a full replica queue answers 503.

Build it from plain arguments (``build_app(args)``), so the same app runs under ``serve run``,
``serve deploy`` with a Serve config file, and ``orchestrator serve``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.serve.exceptions import BackPressureError

STATIC = Path(__file__).resolve().parent / "static"


# ---------------------------------------------------------------- application arguments


class ModelSpec(BaseModel):
    """One served model: a merged model directory, or a base with LoRA adapters (multiplexed)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    task: Literal["causal_lm", "token_classification"]
    path: str | None = Field(None, description="merged model directory (or hub id)")
    base: str | None = Field(None, description="base model for adapters")
    adapters: dict[str, str] = Field(default_factory=dict, description="served name -> adapter directory")
    chat_template: Literal["auto", "plain"] = "auto"
    system_prompt: str | None = None
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_tokens_limit: int = Field(512, ge=1)
    max_input_length: int = Field(512, ge=8)
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(32, ge=-1)
    engine: Literal["continuous", "generate"] = Field(
        "continuous", description="continuous: the decode engine (serve/engine.py; max_batch_size slots); "
                                  "generate: transformers' generate over dynamic batches")
    cuda_graphs: bool = Field(True, description="capture the engine's decode step in CUDA graphs on a GPU")
    autoscaling: dict[str, Any] = Field(default_factory=lambda: {"min_replicas": 1, "max_replicas": 1})
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)

    @model_validator(mode="after")
    def _source(self) -> ModelSpec:
        if bool(self.path) == bool(self.adapters):
            raise ValueError(f"model {self.name}: give either path (a merged model) or base + adapters")
        if self.adapters and not self.base:
            raise ValueError(f"model {self.name}: adapters need base")
        if self.adapters and self.task != "causal_lm":
            raise ValueError(f"model {self.name}: adapter multiplexing is for causal_lm models")
        return self


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)
    auth_token_env: str | None = None


# ---------------------------------------------------------------- requests


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(_Req):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(_Req):
    include_usage: bool = False


class _Sampling(_Req):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="default: min(128, the server's limit)")
    stop: str | list[str] | None = None
    repetition_penalty: float = Field(1.0, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        v = [v] if isinstance(v, str) else v
        if v is not None and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop: at most 4 non-empty strings")
        return v


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


class EntitiesRequest(_Req):
    model: str | None = None
    text: str | None = None
    texts: list[str] | None = None

    @model_validator(mode="after")
    def _one(self) -> EntitiesRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of text or texts")
        if self.texts is not None and not (1 <= len(self.texts) <= 64):
            raise ValueError("texts: between 1 and 64 texts")
        return self


class ClientError(Exception):
    """A request the model cannot serve (e.g. prompt too long): answered with 400."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param}})


# ---------------------------------------------------------------- text generation


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(device):
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


# Batches formed by @serve.batch may all be in flight at once; _Coalescer decides what runs together.
MAX_BATCHES_IN_FLIGHT = 64


class _BatchSizeWarningFilter(logging.Filter):
    """Ray Serve warns when max_batch_size x max_concurrent_batches exceeds max_ongoing_requests; with the
    coalescer the batches in flight are merged, not run side by side, so the warning does not apply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`max_concurrent_batches`" not in record.getMessage()


logging.getLogger("ray.serve").addFilter(_BatchSizeWarningFilter())


class _Coalescer:
    """Runs a batch function on one worker thread at a time. @serve.batch (Ray 2.60) forms a batch from
    what arrives within its wait timeout and does not wait for the model to be free before forming the
    next one, so under load it hands over many small batches; the ones handed in while the model is busy
    are merged here into the next call, up to ``max_size`` items."""

    def __init__(self, fn, max_size: int):
        self.fn, self.max_size = fn, max_size
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.running = False
        self.task: asyncio.Task | None = None  # held: the loop keeps only a weak reference to tasks

    async def submit(self, items: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.pending += list(zip(items, futures, strict=True))
        if not self.running:
            self.running = True
            self.task = loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        try:
            while self.pending:
                take, self.pending = self.pending[: self.max_size], self.pending[self.max_size:]
                try:
                    outs = await asyncio.to_thread(self.fn, [item for item, _ in take])
                except Exception as e:  # noqa: BLE001 (handed to every caller of this batch)
                    for _, f in take:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for (_, f), out in zip(take, outs, strict=True):
                    if not f.done():
                        f.set_result(out)
        finally:
            self.running = False


class TextGenerator:
    """A causal LM replica: batched generation, streaming, and LoRA adapters by model id."""

    def __init__(self, spec: dict[str, Any]):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = ModelSpec.model_validate(spec)
        self.device = _device()
        source = self.spec.path or self.spec.base
        self.tokenizer = AutoTokenizer.from_pretrained(next(iter(self.spec.adapters.values()), source)
                                                       if self.spec.adapters else source)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_dtype(self.device)).to(self.device).eval()
        model.config.use_cache = True
        self.model = model
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 2048))
        self.lock = threading.Lock()
        self.generate_batch.set_max_batch_size(self.spec.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        self.batches: list[tuple[int, float]] = []  # recent batches: (size, seconds in generate)
        self.coalescer = _Coalescer(self._run_batch, self.spec.max_batch_size)
        torch.set_grad_enabled(False)
        self.engine = self._start_engine()

    def _start_engine(self):
        """The continuous-batching engine for a merged model, or None (adapters, other architectures, or
        ``engine: generate``), where requests go through ``generate`` in dynamic batches."""
        from serve.engine import Engine, EngineUnsupported

        if self.spec.engine != "continuous" or self.spec.adapters:
            return None
        max_len = min(self.max_positions, self.spec.max_input_length + self.spec.max_tokens_limit)
        try:
            return Engine(self.model, self.tokenizer, slots=self.spec.max_batch_size, max_len=max_len,
                          cuda_graphs=self.spec.cuda_graphs and self.device.type == "cuda")
        except EngineUnsupported as e:
            logging.getLogger(__name__).warning("model %s: %s; serving through generate", self.spec.name, e)
            return None

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")
        if self.engine is not None and not self.engine.thread.is_alive():
            raise RuntimeError("decode engine stopped")

    def batch_sizes(self) -> list[int]:
        if self.engine is not None:
            return [n for n, _ in self.engine.steps]
        return [n for n, _ in self.batches]

    def batch_log(self) -> list[tuple[int, float]]:
        """Recent batches as (size, seconds): generate calls, or the engine's decode steps."""
        return list(self.engine.steps) if self.engine is not None else list(self.batches)

    async def _engine_events(self, req: dict[str, Any], ids: list[int]):
        """The engine's events for one request; closing this generator (client gone) frees its slot."""
        from serve.engine import Sampling

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        params = Sampling(max_tokens=req["max_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                          repetition_penalty=req["repetition_penalty"], seed=req.get("seed"),
                          stop=list(req.get("stop") or []))
        seq = self.engine.submit(ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        try:
            while True:
                ev = await queue.get()
                # text that piled up while this consumer was busy goes out as one piece (one stream item)
                while "text" in ev and not queue.empty():
                    nxt = queue.get_nowait()
                    if "text" not in nxt:
                        yield ev
                        ev = nxt
                        break
                    ev = {"text": ev["text"] + nxt["text"]}
                yield ev
                if "finish_reason" in ev:
                    return
        finally:
            seq.cancel()

    # -- adapters (multiplexed)
    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_adapter(self, model_id: str) -> str:
        from peft import PeftModel

        path = self.spec.adapters.get(model_id)
        if path is None:
            raise ClientError(f"model {model_id!r} is not served here", "model", 404)
        with self.lock:
            if not hasattr(self.model, "load_adapter") or not hasattr(self.model, "peft_config"):
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=model_id).eval()
            elif model_id not in self.model.peft_config:
                self.model.load_adapter(path, adapter_name=model_id)
        return model_id

    def _prompt(self, req: dict[str, Any]) -> str:
        from orchestrator.tokenization import format_prompt_answer

        if "prompt" in req:
            return req["prompt"]
        messages = req["messages"]
        if self.spec.chat_template == "auto" and getattr(self.tokenizer, "chat_template", None):
            if self.spec.system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.spec.system_prompt}, *messages]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        system = next((m["content"] for m in messages if m["role"] == "system"), self.spec.system_prompt)
        user = [m["content"] for m in messages if m["role"] == "user"]
        return format_prompt_answer(self.tokenizer, user[-1] if user else "", None, "plain", system)[0]

    def _encode(self, req: dict[str, Any]) -> list[int]:
        ids = self.tokenizer(self._prompt(req), add_special_tokens=False)["input_ids"]
        if req["max_tokens"] > self.spec.max_tokens_limit:
            raise ClientError(f"max_tokens={req['max_tokens']} is over this server's limit of "
                              f"{self.spec.max_tokens_limit}", "max_tokens")
        if len(ids) > self.spec.max_input_length or len(ids) + req["max_tokens"] > self.max_positions:
            raise ClientError(f"prompt is {len(ids)} tokens; the limit is {self.spec.max_input_length} and prompt + "
                              f"max_tokens must fit {self.max_positions}", "messages" if "messages" in req else "prompt")
        return ids

    def _gen_kwargs(self, req: dict[str, Any]) -> dict[str, Any]:
        sample = req["temperature"] > 0
        # use_cache explicitly: a checkpoint saved from training may carry use_cache=false in its generation
        # config, and without the KV cache every new token recomputes the whole sequence.
        kw = {"do_sample": sample, "max_new_tokens": req["max_tokens"], "use_cache": True,
              "pad_token_id": self.tokenizer.pad_token_id,
              "eos_token_id": self.tokenizer.eos_token_id, "repetition_penalty": req["repetition_penalty"]}
        if sample:
            kw.update(temperature=req["temperature"], top_p=req["top_p"])
        return kw

    def _finish(self, req: dict[str, Any], new_ids: list[int]) -> dict[str, Any]:
        eos = self.tokenizer.eos_token_id
        hit_eos = eos in new_ids
        if hit_eos:
            new_ids = new_ids[: new_ids.index(eos)]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        reason = "stop" if hit_eos else "length"
        for s in req.get("stop") or []:
            if s in text:
                text, reason = text[: text.index(s)], "stop"
        return {"text": text, "finish_reason": reason, "completion_tokens": len(new_ids)}

    def _generate(self, reqs: list[dict[str, Any]], encoded: list[list[int]],
                  adapter: str | None = None) -> list[dict[str, Any]]:
        """One generate call for requests that share sampling parameters (left-padded batch)."""
        import torch

        width = max(map(len, encoded))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=self.device)
        kw = self._gen_kwargs({**reqs[0], "max_tokens": max(r["max_tokens"] for r in reqs)})
        if reqs[0].get("seed") is not None:
            torch.manual_seed(reqs[0]["seed"])
        with self.lock:  # the adapter switch and the generation it serves are one step
            if adapter:
                self.model.set_adapter(adapter)
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kw)
        results = []
        for r, e, row in zip(reqs, encoded, out.tolist(), strict=True):
            res = self._finish(r, row[width: width + r["max_tokens"]])
            res["prompt_tokens"] = len(e)
            results.append(res)
        return results

    def _run_batch(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Encode, group by sampling parameters, generate (worker thread)."""
        t0 = time.perf_counter()
        results: list[Any] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        encoded: list[Any] = []
        for i, r in enumerate(reqs):
            try:
                encoded.append(self._encode(r))
            except ClientError as e:
                encoded.append(None)
                results[i] = {"error": e.message, "param": e.param, "status": e.status}
                continue
            key = (r["temperature"], r["top_p"], r["repetition_penalty"], r.get("seed"))
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            outs = self._generate([reqs[i] for i in idx], [encoded[i] for i in idx])
            for i, o in zip(idx, outs, strict=True):
                results[i] = o
        self.batches = (self.batches + [(len(reqs), time.perf_counter() - t0)])[-1000:]
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=MAX_BATCHES_IN_FLIGHT)
    async def generate_batch(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self.coalescer.submit(reqs)

    def _defaults(self, req: dict[str, Any]) -> dict[str, Any]:
        return {**req, "max_tokens": req.get("max_tokens") or min(128, self.spec.max_tokens_limit)}

    async def complete(self, req: dict[str, Any]) -> dict[str, Any]:
        """A whole completion: batched for the merged model, one at a time for an adapter."""
        req = self._defaults(req)
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.get_adapter(model_id)
            try:
                encoded = self._encode(req)
            except ClientError as e:
                return {"error": e.message, "param": e.param, "status": e.status}
            return (await asyncio.to_thread(self._generate, [req], [encoded], model_id))[0]
        if self.engine is None:
            return await self.generate_batch(req)
        try:
            ids = self._encode(req)
        except ClientError as e:
            return {"error": e.message, "param": e.param, "status": e.status}
        pieces: list[str] = []
        async for ev in self._engine_events(req, ids):
            if "text" in ev:
                pieces.append(ev["text"])
            elif "error" in ev:
                return {"error": f"generation failed: {ev['error']}", "param": None, "status": 500}
            else:
                return {"text": "".join(pieces), "finish_reason": ev["finish_reason"],
                        "completion_tokens": ev["completion_tokens"], "prompt_tokens": ev["prompt_tokens"]}
        return {"error": "generation ended without a result", "param": None, "status": 500}

    async def stream(self, req: dict[str, Any]):
        """Yield {"text": piece} as tokens arrive, then {"finish_reason", ...}."""
        from transformers import TextIteratorStreamer

        req = self._defaults(req)
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.get_adapter(model_id)
        try:
            ids = self._encode(req)
        except ClientError as e:
            yield {"error": e.message, "param": e.param, "status": e.status}
            return
        if self.engine is not None and not model_id:
            async for ev in self._engine_events(req, ids):
                if "error" in ev:
                    yield {"finish_reason": "error"}
                    return
                yield ev
            return
        import torch

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = torch.tensor([ids], device=self.device)

        def run():
            with self.lock:
                if model_id:
                    self.model.set_adapter(model_id)
                self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), streamer=streamer,
                                    **self._gen_kwargs(req))

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        text, stops, sent = "", req.get("stop") or [], 0
        it = iter(streamer)
        while True:
            piece = await asyncio.to_thread(next, it, None)
            if piece is None:
                break
            text += piece
            cut = min((text.index(s) for s in stops if s in text), default=None)
            if cut is not None:
                if cut > sent:
                    yield {"text": text[sent:cut]}
                yield {"finish_reason": "stop"}
                worker.join()
                return
            # hold back a tail that could be the start of a stop string
            hold = max((len(s) - 1 for s in stops), default=0)
            upto = max(sent, len(text) - hold)
            if upto > sent:
                yield {"text": text[sent:upto]}
                sent = upto
        worker.join()
        if len(text) > sent:
            yield {"text": text[sent:]}
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        yield {"finish_reason": "length" if n >= req["max_tokens"] else "stop", "completion_tokens": n,
               "prompt_tokens": len(ids)}


# ---------------------------------------------------------------- entity extraction


class EntityExtractor:
    """A token-classification replica: batched tagging, BIO -> character spans with scores."""

    def __init__(self, spec: dict[str, Any]):
        import torch
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        self.spec = ModelSpec.model_validate(spec)
        self.device = _device()
        self.tokenizer = AutoTokenizer.from_pretrained(self.spec.path)
        self.model = AutoModelForTokenClassification.from_pretrained(self.spec.path).to(self.device).eval()
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.extract_batch.set_max_batch_size(self.spec.max_batch_size)
        self.extract_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        self.coalescer = _Coalescer(self._extract, self.spec.max_batch_size)
        torch.set_grad_enabled(False)

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=MAX_BATCHES_IN_FLIGHT)
    async def extract_batch(self, texts: list[str]) -> list[list[dict[str, Any]]]:
        return await self.coalescer.submit(texts)

    def _extract(self, texts: list[str]) -> list[list[dict[str, Any]]]:
        import torch

        enc = self.tokenizer(texts, return_offsets_mapping=True, padding=True, truncation=True,
                             max_length=self.spec.max_input_length, return_tensors="pt")
        offsets = enc.pop("offset_mapping").tolist()
        probs = torch.softmax(self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float(), -1).cpu()
        out = []
        for b, text in enumerate(texts):
            words: dict[int, list[int]] = {}
            for t, w in enumerate(enc.word_ids(b)):
                if w is not None:
                    words.setdefault(w, []).append(t)
            spans: list[dict[str, Any]] = []
            cur = None
            for w in sorted(words):
                toks = words[w]
                p = probs[b, toks[0]]  # the label rides on the word's first sub-token, as in training
                label = self.id2label[int(p.argmax())]
                start, end = offsets[b][toks[0]][0], offsets[b][toks[-1]][1]
                kind = label[2:] if label[:2] in ("B-", "I-") else None
                if kind and cur and label.startswith("I-") and cur["type"] == kind:
                    cur["end"], cur["scores"] = end, cur["scores"] + [float(p.max())]
                    continue
                if cur:
                    spans.append(cur)
                cur = {"type": kind, "start": start, "end": end, "scores": [float(p.max())]} if kind else None
            if cur:
                spans.append(cur)
            out.append([{"type": s["type"], "start": s["start"], "end": s["end"], "text": text[s["start"]:s["end"]],
                         "score": round(sum(s["scores"]) / len(s["scores"]), 4)} for s in spans])
        return out

    async def extract(self, text: str) -> list[dict[str, Any]]:
        return await self.extract_batch(text)


# ---------------------------------------------------------------- the HTTP ingress

api = FastAPI(title="orchestrator", description="OpenAI-compatible generation and entity extraction")


@api.exception_handler(RequestValidationError)
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

    def _auth(self, request: Request):
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
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

    @staticmethod
    def _busy():
        return _error(503, "the server is at capacity; retry shortly", kind="overloaded")

    async def _text(self, request: Request, body: _Sampling, kind: str):
        if (denied := self._auth(request)) is not None:
            return denied
        picked, err = self._pick(body.model, "causal_lm")
        if err:
            return err
        name, handle = picked
        req = body.model_dump(exclude={"model", "stream", "stream_options"})
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(handle, req, rid, name, kind, usage)
        try:
            res = await handle.complete.remote(req)
        except BackPressureError:
            return self._busy()
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

    async def _stream(self, handle, req: dict[str, Any], rid: str, name: str, kind: str, usage: bool = False):
        gen = handle.options(stream=True).stream.remote(req)
        try:
            first = await gen.__anext__()
        except BackPressureError:
            return self._busy()
        except StopAsyncIteration:
            first = {"finish_reason": "stop"}
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
            async for item in gen:
                yield chunk(item)
                last = item
            if usage and "completion_tokens" in last:  # OpenAI's stream_options.include_usage: a last chunk
                counts = {k: last[k] for k in ("prompt_tokens", "completion_tokens")}
                yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk" if kind == "chat"
                                             else "text_completion", "created": created, "model": name,
                                             "choices": [], "usage": {**counts, "total_tokens": sum(counts.values())}}
                                            ) + "\n\n"
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
        if (denied := self._auth(request)) is not None:
            return denied
        picked, err = self._pick(body.model, "token_classification")
        if err:
            return err
        name, handle = picked
        texts = [body.text] if body.text is not None else body.texts
        try:
            found = await asyncio.gather(*(handle.extract.remote(t) for t in texts))
        except BackPressureError:
            return self._busy()
        if body.text is not None:
            return {"model": name, "entities": found[0]}
        return {"model": name, "results": [{"entities": f} for f in found]}

    async def healthz(self):
        return {"status": "ok", "models": self.tasks}

    async def page(self):
        return HTMLResponse((STATIC / "chat.html").read_text(encoding="utf-8"))


def _wire_routes() -> None:
    """FastAPI routes onto Gateway's methods (declared once; the class stays readable above)."""
    api.post("/v1/chat/completions")(Gateway.chat)
    api.post("/v1/completions")(Gateway.completions)
    api.get("/v1/models")(Gateway.models)
    api.post("/v1/entities")(Gateway.entities)
    api.get("/healthz")(Gateway.healthz)
    api.get("/", response_class=HTMLResponse)(Gateway.page)


_wire_routes()
# The gateway only validates and forwards (the models' replicas do the work): it reserves no CPU, so a
# small machine's cores go to the model replicas.
GatewayDeployment = serve.deployment(name="Gateway", max_ongoing_requests=256,
                                     ray_actor_options={"num_cpus": 0})(serve.ingress(api)(Gateway))


def _options(spec: ModelSpec) -> dict[str, Any]:
    auto = dict(spec.autoscaling)
    return {"name": f"{'TextGenerator' if spec.task == 'causal_lm' else 'EntityExtractor'}-{spec.name}",
            "max_ongoing_requests": spec.max_ongoing_requests, "max_queued_requests": spec.max_queued_requests,
            "autoscaling_config": auto, "health_check_period_s": 10, "health_check_timeout_s": 30,
            "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}}


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder (``serve run serve.app:build_app`` / an ``import_path`` in a Serve config)."""
    parsed = AppArgs.model_validate(args)
    routes, tasks, multiplexed = {}, {}, {}
    for spec in parsed.models:
        cls = TextGenerator if spec.task == "causal_lm" else EntityExtractor
        dep = serve.deployment(cls).options(**_options(spec)).bind(spec.model_dump())
        if spec.adapters:
            for served in spec.adapters:
                routes[served], tasks[served], multiplexed[served] = dep, spec.task, served
        else:
            routes[spec.name], tasks[spec.name] = dep, spec.task
    return GatewayDeployment.bind(routes, tasks, multiplexed, parsed.auth_token_env)
