"""The text-generation deployment: the decode engine (serve/engine.py) for the families it implements, with a
base's LoRA adapters served in the same steps, chosen by the request's model; transformers' ``generate`` in
dynamic batches for other architectures (adapters there by model id through ``@serve.multiplexed``)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve

from serve.schemas import ClientError, ModelSpec


def serving_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def serving_dtype(device):
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


LOAD_DELAY_ENV = "ORCHESTRATOR_SERVE_LOAD_DELAY_S"  # seconds a replica sleeps before loading (readiness tests)
# Batches formed by @serve.batch may all be in flight at once; Coalescer decides what runs together.
MAX_BATCHES_IN_FLIGHT = 64


class _BatchSizeWarningFilter(logging.Filter):
    """Ray Serve warns when max_batch_size x max_concurrent_batches exceeds max_ongoing_requests; with the
    coalescer the batches in flight are merged, not run side by side, so the warning does not apply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`max_concurrent_batches`" not in record.getMessage()


logging.getLogger("ray.serve").addFilter(_BatchSizeWarningFilter())


class Coalescer:
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


MAX_ADAPTERS_PER_REPLICA = 4


class _Wakeups:
    """Engine events handed to the replica's event loop: one wake-up per burst (a decode step hands out a
    token to every sequence at once) instead of one ``call_soon_threadsafe`` per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.scheduled = False

    def emit(self, queue: asyncio.Queue, ev: dict[str, Any]) -> None:
        """Called on the engine's thread."""
        with self.lock:
            self.pending.append((queue, ev))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for queue, ev in items:
            queue.put_nowait(ev)


class _LoadedAdapter:
    """What @serve.multiplexed caches for one adapter; evicting it (Serve calls ``__del__``) unloads the
    adapter's weights from the replica's model, so memory does not grow with every adapter ever asked for."""

    def __init__(self, owner: TextGenerator, name: str):
        self.owner, self.name, self.loaded = owner, name, True

    def __del__(self):
        if self.loaded:
            self.loaded = False
            self.owner.unload_adapter(self.name)


class TextGenerator:
    """A causal LM replica: batched generation, streaming, and LoRA adapters by model id."""

    def __init__(self, spec: dict[str, Any]):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if delay := os.environ.get(LOAD_DELAY_ENV):  # tests: a replica that takes a while to load
            time.sleep(float(delay))
        self.spec = ModelSpec.model_validate(spec)
        self.device = serving_device()
        source = self.spec.path or self.spec.base
        # an adapter saved by training carries the tokenizer it was trained with; else the base's
        first = next(iter(self.spec.adapters.values()), None)
        has_own = first is not None and (Path(first) / "tokenizer_config.json").is_file()
        self.tokenizer = AutoTokenizer.from_pretrained(first if has_own else source)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(source, dtype=serving_dtype(self.device)).to(self.device).eval()
        model.config.use_cache = True
        self.model = model
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 2048))
        self.lock = threading.Lock()
        batch = self.spec.max_batch_size or 8
        self.generate_batch.set_max_batch_size(batch)
        self.generate_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        self.batches: list[tuple[int, float]] = []  # recent batches: (size, seconds in generate)
        self.coalescer = Coalescer(self._run_batch, batch)
        torch.set_grad_enabled(False)
        # the engine thread shares the GIL with this replica's event loop: let it back in within 1 ms, not 5
        sys.setswitchinterval(0.001)
        self.engine = self._start_engine()
        self._wakeups: _Wakeups | None = None

    def _start_engine(self):
        """The continuous-batching engine (adapters included), or None (other architectures, or ``engine:
        generate``), where requests go through ``generate`` in dynamic batches."""
        from serve.engine import Engine, EngineUnsupported

        if self.spec.engine != "continuous":
            return None
        spec, gpu = self.spec, self.device.type == "cuda"
        max_len = min(self.max_positions, spec.max_input_length + spec.max_tokens_limit)
        try:
            return Engine(self.model, self.tokenizer, max_seqs=spec.max_batch_size or (256 if gpu else 8),
                          max_len=max_len, block_size=spec.kv_block_size,
                          gpu_memory_utilization=spec.gpu_memory_utilization, prefill_chunk=spec.prefill_chunk,
                          max_prefill=spec.max_prefill, cuda_graphs=spec.cuda_graphs and gpu,
                          use_kernels=None if spec.kernels else False,
                          batch_invariant=spec.batch_invariant, prefix_caching=spec.prefix_caching,
                          adapters=spec.adapters or None, max_adapters=spec.max_adapters,
                          stream_interval=spec.stream_interval_ms / 1000,
                          stream_items_per_s=spec.stream_items_per_s)
        except EngineUnsupported as e:
            logging.getLogger(__name__).warning("model %s: %s; serving through generate", spec.name, e)
            return None

    def ready(self) -> bool:
        """Answers once the replica is built (its engine's graphs captured): what readiness checks call."""
        return True

    def stats(self, window_s: float | None = None) -> dict[str, Any]:
        """What the engine chose and how it runs (KV blocks, sequences, prefix-cache hits, adapters; first-token
        times of the requests of the last ``window_s`` seconds)."""
        if self.engine is None:
            return {"model": self.spec.name, "path": "generate", "batches": len(self.batches)}
        return {"model": self.spec.name, "path": "engine", **self.engine.stats(window_s)}

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

    async def _engine_events(self, req: dict[str, Any], ids: list[int], adapter: str | None = None,
                             trace: dict[str, float] | None = None):
        """The engine's events for one request; closing this generator (client gone) frees its blocks. With
        ``trace``, the first event carries it with the engine's and this loop's times added."""
        from serve.engine import Sampling

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        params = Sampling(max_tokens=req["max_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                          repetition_penalty=req["repetition_penalty"], seed=req.get("seed"),
                          stop=list(req.get("stop") or []))
        if self._wakeups is None or self._wakeups.loop is not loop:
            self._wakeups = _Wakeups(loop)
        seq = self.engine.submit(ids, params, functools.partial(self._wakeups.emit, queue), adapter)
        try:
            while True:
                ev = await queue.get()
                if trace is not None:  # engine times are perf_counter(): to the wall clock by this moment's offset
                    shift = time.time() - time.perf_counter()
                    trace.update(engine_submit=seq.submitted + shift, replica_first=time.time())
                    if seq.first_token_at:
                        trace["engine_first"] = seq.first_token_at + shift
                    ev, trace = {**ev, "_trace": trace}, None
                # text that piled up while this consumer was busy goes out as one piece (one stream item)
                while "text" in ev and not queue.empty():
                    nxt = queue.get_nowait()
                    if "text" not in nxt:
                        yield ev
                        ev = nxt
                        break
                    ev = {**ev, "text": ev["text"] + nxt["text"]}  # a trace on the first piece stays on it
                yield ev
                if "finish_reason" in ev:
                    return
        finally:
            seq.cancel()

    # -- adapters (multiplexed)
    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS_PER_REPLICA)
    async def get_adapter(self, model_id: str) -> _LoadedAdapter:
        if model_id not in self.spec.adapters:
            raise ClientError(f"model {model_id!r} is not served here", "model", 404)
        with self.lock:
            self._ensure_adapter(model_id)
        return _LoadedAdapter(self, model_id)

    def _ensure_adapter(self, name: str) -> None:
        """Load adapter ``name`` into the model if it is not there (the caller holds the lock)."""
        from peft import PeftModel

        path = self.spec.adapters[name]
        if not hasattr(self.model, "load_adapter") or not hasattr(self.model, "peft_config"):
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
        elif name not in self.model.peft_config:
            self.model.load_adapter(path, adapter_name=name)

    def _activate(self, name: str) -> None:
        """Make ``name`` the active adapter (the caller holds the lock); an adapter evicted between the
        request's get_adapter and now is loaded again."""
        self._ensure_adapter(name)
        self.model.set_adapter(name)

    def unload_adapter(self, name: str) -> None:
        """Drop an adapter's weights from the model (called when @serve.multiplexed evicts it)."""
        with self.lock:
            config = getattr(self.model, "peft_config", None)
            if not config or name not in config:
                return
            if len(config) == 1:  # the last one: back to the plain base model
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)

    def adapter_stats(self) -> dict[str, Any]:
        """Adapters loaded in this replica and their parameters (for tests and operators)."""
        with self.lock:
            names = sorted(getattr(self.model, "peft_config", {}) or {})
            n = sum(p.numel() for k, p in self.model.named_parameters() if "lora_" in k)
        return {"loaded": names, "lora_parameters": n}

    def _prompt(self, req: dict[str, Any]) -> str:
        from orchestrator.data.tokenization import format_prompt_answer

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
                self._activate(adapter)
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
                results[i] = e.as_dict()
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

    async def _admit(self, req: dict[str, Any], model_id: str | None) -> list[int] | dict[str, Any]:
        """The request's prompt ids (its adapter loaded, on the generate path), or the client error to hand back."""
        if model_id and model_id not in self.spec.adapters:
            return ClientError(f"model {model_id!r} is not served here", "model", 404).as_dict()
        if model_id and self.engine is None:
            await self.get_adapter(model_id)
        try:
            return self._encode(req)
        except ClientError as e:
            return e.as_dict()

    async def complete(self, req: dict[str, Any], model_id: str | None = None) -> dict[str, Any]:
        """A whole completion: batched for the merged model, one at a time for an adapter (``model_id``: the
        served adapter; unset, the request's multiplexed model id)."""
        req = self._defaults(req)
        model_id = serve.get_multiplexed_model_id() if model_id is None else model_id
        if not model_id and self.engine is None:
            return await self.generate_batch(req)  # encoded with its batch
        ids = await self._admit(req, model_id)
        if isinstance(ids, dict):
            return ids
        if self.engine is None:
            return (await asyncio.to_thread(self._generate, [req], [ids], model_id))[0]
        pieces: list[str] = []
        async for ev in self._engine_events(req, ids, model_id or None):
            if "text" in ev:
                pieces.append(ev["text"])
            elif "error" in ev:
                return {"error": f"generation failed: {ev['error']}", "param": None, "status": 500}
            else:
                return {"text": "".join(pieces), "finish_reason": ev["finish_reason"],
                        "completion_tokens": ev["completion_tokens"], "prompt_tokens": ev["prompt_tokens"]}
        return {"error": "generation ended without a result", "param": None, "status": 500}

    async def stream(self, req: dict[str, Any], model_id: str | None = None):
        """Yield {"text": piece} as tokens arrive, then {"finish_reason", ...}."""
        from transformers import TextIteratorStreamer

        trace = req.pop("_trace", None)  # the gateway's hop times (x-orchestrator-trace)
        if trace is not None:
            trace["replica_in"] = time.time()
        req = self._defaults(req)
        model_id = serve.get_multiplexed_model_id() if model_id is None else model_id
        ids = await self._admit(req, model_id)
        if isinstance(ids, dict):
            yield ids
            return
        if self.engine is not None:
            async for ev in self._engine_events(req, ids, model_id or None, trace):
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
                    self._activate(model_id)
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
