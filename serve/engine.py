"""Continuous-batching decode for Llama-family causal LMs: plain torch, no Ray, no HTTP.

A fixed number of slots each hold one sequence's KV cache (``[layers][slots, kv_heads, max_len, head_dim]``).
A request is prefilled into a free slot, joins the running batch at the next decode step and leaves it the
step it ends (EOS, ``max_tokens``, a stop string, or cancellation), which frees the slot for the next one.

On a GPU the decode step is captured in CUDA graphs, one per (batch bucket, attention-length bucket): a step
is one graph replay plus a few sampling kernels, with no host sync inside. The engine thread runs one step
ahead of the host: it launches step k+1 on the GPU from step k's tokens (which never leave the GPU) and
only then waits for step k's tokens to hand them out and decide who finished, so Python work overlaps the
GPU. A sequence that ended at step k still rides along in step k+1; that step's token for it is dropped.

Greedy output does not depend on what else is in the batch: each row's attention reads only its own
slot, and the CPU tests check it token for token against ``generate``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2")


class EngineUnsupported(ValueError):
    """The model's architecture is not one the engine's decode step implements."""


@dataclass
class Sampling:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Sequence:
    """One request in the engine. ``emit(event)`` is called from the engine thread with
    ``{"text": piece}`` while it decodes and one final ``{"finish_reason", "completion_tokens", ...}``."""

    prompt: list[int]
    params: Sampling
    emit: Callable[[dict[str, Any]], None]
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    cancelled: bool = False
    done: bool = False
    text: str = ""
    sent: int = 0  # characters of text handed out
    prefix_off: int = 0
    read_off: int = 0
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """The client is gone: the slot is freed at the next step."""
        self.cancelled = True


def check_supported(config) -> None:
    if getattr(config, "model_type", None) not in SUPPORTED:
        raise EngineUnsupported(f"model_type {getattr(config, 'model_type', None)!r}: the decode engine "
                                f"implements {', '.join(SUPPORTED)}")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise EngineUnsupported("sliding-window attention is not implemented by the decode engine")


class _Decoder:
    """The model's forward pass over the slot KV cache: batched prefill and the single-token decode step."""

    def __init__(self, model, slots: int, max_len: int):
        cfg = model.config
        check_supported(cfg)
        self.model, self.slots, self.max_len = model, slots, max_len
        self.layers = model.model.layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.gqa = bool(self.kv_heads != self.heads)  # a plain bool: the compiled step must not trace it
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        shape = (slots, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        # q/k/v and gate/up as one matmul each: the modules' weights become views into the fused tensors
        self.qkv = [_fuse(ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj) for ly in self.layers]
        self.gate_up = [_fuse(ly.mlp.gate_proj, ly.mlp.up_proj) for ly in self.layers]
        self.split = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        pos = torch.arange(max_len, device=self.device)
        dummy = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = model.model.rotary_emb(dummy, pos[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        self.arange = pos

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for ``positions`` [n, T], shaped [n, T, 1, d] (once per forward, shared by the layers)."""
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)

    def _qkv(self, i: int, h: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]):
        """h [n, T, hidden] -> q [n, H, T, d], k/v [n, T, kvh, d] (q and k rotated together)."""
        n, t, _ = h.shape
        qkv = F.linear(h, *self.qkv[i]).view(n, t, self.heads + 2 * self.kv_heads, self.head_dim)
        qk = self._rope(qkv[:, :, : self.heads + self.kv_heads], *rot)
        q, k = qk[:, :, : self.heads], qk[:, :, self.heads:]
        return q.transpose(1, 2), k, qkv[:, :, self.heads + self.kv_heads:]

    @staticmethod
    def _norm(module, h: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm as one fused op."""
        return F.rms_norm(h, (h.shape[-1],), module.weight, module.variance_epsilon)

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        mlp = self.layers[i].mlp
        gate, up = F.linear(h, *self.gate_up[i]).chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def _finish(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self._norm(self.model.model.norm, h)).float()

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts ``ids`` [n, T] into ``slots`` [n]; logits [n, vocab] at each last prompt token."""
        n, t = ids.shape
        positions = self.arange[:t].expand(n, t)
        h = self.model.model.embed_tokens(ids)
        gqa, rot = self.gqa, self._rotary(positions)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = self._norm(layer.input_layernorm, h)
            q, k, v = self._qkv(i, x, rot)
            self.k[i][slots[:, None], :, positions] = k
            self.v[i][slots[:, None], :, positions] = v
            o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               enable_gqa=gqa)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(n, t, -1))
            h = h + self._mlp(i, self._norm(layer.post_attention_layernorm, h))
        last = h[torch.arange(n, device=h.device), lengths - 1]
        return self._finish(last)

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """One token for slots 0..B-1 (``ids``/``pos`` [B]); attention reads the first ``span`` cache positions."""
        b = ids.shape[0]
        rows = self.arange[:b]
        h = self.model.model.embed_tokens(ids[:, None])
        mask = (self.arange[:span][None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, span]
        gqa, rot = self.gqa, self._rotary(pos[:, None])
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = self._norm(layer.input_layernorm, h)
            q, k, v = self._qkv(i, x, rot)
            self.k[i][rows, :, pos] = k[:, 0]
            self.v[i][rows, :, pos] = v[:, 0]
            o = F.scaled_dot_product_attention(q, self.k[i][:b, :, :span], self.v[i][:b, :, :span],
                                               attn_mask=mask, enable_gqa=gqa)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
            h = h + self._mlp(i, self._norm(layer.post_attention_layernorm, h))
        return self._finish(h[:, 0])


def _fuse(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linear layers on the same input; each layer keeps a view of it."""
    weight = torch.cat([m.weight.data for m in linears])
    bias = torch.cat([m.bias.data for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start:start + rows]
        if bias is not None:
            m.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias


def _buckets(limit: int, start: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


class Engine:
    """Schedules requests onto slots and runs the decode loop on its own thread.

    ``model``: a transformers causal LM (Llama family) in eval mode on its device; ``slots``: the most
    sequences decoded together; ``max_len``: prompt + new tokens of one sequence. ``cuda_graphs``: capture the
    decode step (default: on when the model is on a GPU); ``compile_step``: torch.compile the step first.
    """

    def __init__(self, model, tokenizer, slots: int = 8, max_len: int = 1024, cuda_graphs: bool | None = None,
                 compile_step: bool = False):
        self.tokenizer = tokenizer
        self.eos = set(_eos_ids(model, tokenizer))
        self.slots, self.max_len = slots, max_len
        self.dec = _Decoder(model, slots, max_len)
        self.device = self.dec.device
        self.vocab = model.config.vocab_size
        self.graphs_on = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # Optional torch.compile of the step (one dynamic-shape compile for every bucket). Off by default: for
        # a 32-layer model it did not finish within 3.5 minutes of replica start on an H100 (BENCHMARKS.md).
        self.step = self.dec.decode
        if compile_step:
            self.step = torch.compile(self.dec.decode, dynamic=True, fullgraph=True)
        self.batch_buckets = _buckets(slots, 1)
        self.span_buckets = _buckets(max_len, min(256, max_len))
        # decode inputs live on the device between steps: the next step reads the last step's tokens there
        self.ids = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.seen = torch.zeros(slots, self.vocab, dtype=torch.bool, device=self.device)  # repetition penalty
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pinned = torch.zeros(slots, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.waiting: deque[Sequence] = deque()
        self.active: dict[int, Sequence] = {}  # slot -> sequence
        self.pos_host = [0] * slots
        self.cv = threading.Condition()
        self.stopped = False
        self.steps: deque[tuple[int, float]] = deque(maxlen=2000)  # (batch size, seconds) per decode step
        if self.graphs_on:
            self._capture()
        self.thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, prompt: list[int], params: Sampling, emit: Callable[[dict[str, Any]], None]) -> Sequence:
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"engine's {self.max_len} positions")
        seq = Sequence(list(prompt), params, emit)
        if params.temperature > 0 and params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        with self.cv:
            self.waiting.append(seq)
            self.cv.notify()
        return seq

    def shutdown(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.thread.join(timeout=30)

    def load(self) -> dict[str, int]:
        return {"active": len(self.active), "waiting": len(self.waiting), "slots": self.slots}

    # ------------------------------------------------------------------ graphs

    def _bucket(self, buckets: list[int], n: int) -> int:
        return next(b for b in buckets if b >= n)

    def _capture(self) -> None:
        t0 = time.perf_counter()
        if self.step is not self.dec.decode:
            try:
                with torch.inference_mode():
                    for b in (1, self.slots):  # size 1 is specialized by the compiler; the rest share one graph
                        self.step(self.ids[:b], self.pos[:b], self.span_buckets[-1])
                torch.cuda.synchronize()
                log.info("decode engine: step compiled in %.1f s", time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 (the eager step is correct, only slower)
                log.warning("decode engine: torch.compile failed (%s: %s); capturing the eager step",
                            type(e).__name__, str(e)[:300])
                self.step = self.dec.decode
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode():
            for span in reversed(self.span_buckets):  # largest first: later graphs reuse its pool memory
                for b in reversed(self.batch_buckets):
                    with torch.cuda.stream(stream):
                        for _ in range(2):
                            self.step(self.ids[:b], self.pos[:b], span)
                    torch.cuda.current_stream().wait_stream(stream)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                        out = self.step(self.ids[:b], self.pos[:b], span)
                    self.graphs[(b, span)] = (g, out)
        torch.cuda.synchronize()
        log.info("decode engine: %d CUDA graphs captured in %.1f s", len(self.graphs), time.perf_counter() - t0)

    def _decode_logits(self, b: int, span: int) -> torch.Tensor:
        if self.graphs_on:
            g, out = self.graphs[(b, span)]
            g.replay()
            return out
        return self.step(self.ids[:b], self.pos[:b], span)

    # ------------------------------------------------------------------ sampling (on the device)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence | None], slots: torch.Tensor | None) -> torch.Tensor:
        """Next tokens for rows of ``logits``; ``seqs[i]`` is row i's sequence (None: an idle slot)."""
        live = [s for s in seqs if s is not None]
        if any(s.params.repetition_penalty != 1.0 for s in live):
            pen = torch.tensor([s.params.repetition_penalty if s else 1.0 for s in seqs], device=logits.device)
            seen = self.seen[slots] if slots is not None else self.seen[: len(seqs)]
            penalized = torch.where(logits > 0, logits / pen[:, None], logits * pen[:, None])
            logits = torch.where(seen, penalized, logits)
        greedy = logits.argmax(-1)
        if not any(s.params.temperature > 0 for s in live):
            return greedy
        temp = torch.tensor([s.params.temperature if s and s.params.temperature > 0 else 1.0 for s in seqs],
                            device=logits.device)
        probs = torch.softmax(logits / temp[:, None], dim=-1)
        if any(s.params.top_p < 1.0 for s in live):
            top_p = torch.tensor([s.params.top_p if s else 1.0 for s in seqs], device=logits.device)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        noise = torch.empty_like(probs).exponential_()
        for i, s in enumerate(seqs):
            if s is not None and s.generator is not None:
                noise[i] = torch.empty(probs.shape[-1], device=probs.device).exponential_(generator=s.generator)
        sampled = (probs / noise).argmax(-1)  # exponential race: a draw from probs
        hot = torch.tensor([bool(s and s.params.temperature > 0) for s in seqs], device=logits.device)
        return torch.where(hot, sampled, greedy)

    # ------------------------------------------------------------------ the loop

    def _admit(self) -> list[tuple[Sequence, torch.Tensor]]:
        """Prefill waiting requests into free slots; returns (sequence, first token on the device)."""
        with self.cv:
            free = [s for s in range(self.slots) if s not in self.active]
            take = []
            while self.waiting and free:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    self._end(seq, "cancelled")
                    continue
                seq.slot = free.pop(0)
                self.active[seq.slot] = seq
                take.append(seq)
        if not take:
            return []
        width = max(len(s.prompt) for s in take)
        ids = torch.tensor([s.prompt + [0] * (width - len(s.prompt)) for s in take], device=self.device)
        lengths = torch.tensor([len(s.prompt) for s in take], device=self.device)
        slots = torch.tensor([s.slot for s in take], device=self.device)
        logits = self.dec.prefill(ids, lengths, slots)
        if any(s.params.repetition_penalty != 1.0 for s in take):
            self.seen[slots] = False
            for s in take:
                self.seen[s.slot, torch.tensor(s.prompt, device=self.device)] = True
        first = self._sample(logits, take, slots)
        self.ids[slots] = first
        self.pos[slots] = lengths
        self.seen[slots, first] = True
        for s in take:
            self.pos_host[s.slot] = len(s.prompt)
        return list(zip(take, first, strict=True))

    def _launch(self) -> tuple[list[Sequence | None], torch.Tensor, int] | None:
        """One decode step over the slots in use (eagerly queued on the device; nothing waits for it)."""
        if not self.active:
            return None
        top = max(self.active) + 1
        b = self._bucket(self.batch_buckets, top)
        span = self._bucket(self.span_buckets, max(self.pos_host[s] for s in self.active) + 1)
        seqs = [self.active.get(i) for i in range(b)]
        logits = self._decode_logits(b, span)
        nxt = self._sample(logits, seqs, None)
        self.ids[:b] = nxt
        self.pos[:b] = torch.clamp(self.pos[:b] + 1, max=self.max_len - 1)
        self.seen[self.dec.arange[:b], nxt] = True
        for s in self.active:
            self.pos_host[s] += 1
        return seqs, nxt, b

    def _to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        n = tokens.shape[0]
        if self.device.type != "cuda":
            return tokens.clone(), None
        self.pinned[:n].copy_(tokens, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return self.pinned[:n], ev

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        pending: tuple[list[Sequence | None], list[int]] | None = None
        try:
            with torch.inference_mode():
                while True:
                    with self.cv:
                        while not self.stopped and not self.waiting and not self.active and pending is None:
                            self.cv.wait()
                        if self.stopped:
                            break
                    admitted = self._admit()
                    if admitted:
                        seqs = [s for s, _ in admitted]
                        firsts = torch.stack([t for _, t in admitted])
                        host, ev = self._to_host(firsts)
                        if ev is not None:
                            ev.synchronize()
                        self._hand_out(seqs, host.tolist())
                    t0 = time.perf_counter()
                    launched = self._launch()
                    if pending is not None:
                        self._hand_out(*pending)
                        pending = None
                    if launched is not None:
                        seqs, nxt, b = launched
                        host, ev = self._to_host(nxt)
                        if ev is not None:
                            ev.synchronize()
                        pending = (seqs, host.tolist())
                        self.steps.append((sum(s is not None for s in seqs), time.perf_counter() - t0))
                if pending is not None:
                    self._hand_out(*pending)
        except Exception as e:  # noqa: BLE001 (every request waiting on the engine gets the error)
            log.exception("decode engine failed")
            with self.cv:
                for s in list(self.active.values()) + list(self.waiting):
                    self._end(s, "error", error=f"{type(e).__name__}: {e}")
                self.active.clear()
                self.waiting.clear()

    def _hand_out(self, seqs: list[Sequence | None], tokens: list[int]) -> None:
        """Append each live sequence's new token, emit text, and end those that are done."""
        for seq, tok in zip(seqs, tokens, strict=False):
            if seq is None or seq.done:
                continue
            if seq.cancelled:
                self._free(seq)
                self._end(seq, "cancelled")
                continue
            if tok in self.eos:
                self._free(seq)
                self._end(seq, "stop")
                continue
            seq.tokens.append(tok)
            reason = self._detokenize(seq)
            if reason is None and len(seq.tokens) >= seq.params.max_tokens:
                reason = "length"
            if reason is not None:
                self._free(seq)
                self._end(seq, reason)

    def _detokenize(self, seq: Sequence) -> str | None:
        """Incremental detokenization (a window of the last tokens), stop strings, and the text handed out;
        a tail that could begin a stop string is held back. Returns "stop" when a stop string completed."""
        tok = self.tokenizer
        prefix = tok.decode(seq.tokens[seq.prefix_off:seq.read_off], skip_special_tokens=True)
        full = tok.decode(seq.tokens[seq.prefix_off:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # an incomplete character: wait for the next token
        seq.text += full[len(prefix):]
        seq.prefix_off, seq.read_off = seq.read_off, len(seq.tokens)
        stops = seq.params.stop
        cut = min((i for i in (seq.text.find(s, max(0, seq.sent - len(s))) for s in stops) if i >= 0), default=None)
        if cut is not None:
            seq.text = seq.text[:cut]
            if cut > seq.sent:
                seq.emit({"text": seq.text[seq.sent:cut]})
            seq.sent = cut
            return "stop"
        hold = max((len(s) - 1 for s in stops), default=0)
        upto = max(seq.sent, len(seq.text) - hold)
        if upto > seq.sent:
            seq.emit({"text": seq.text[seq.sent:upto]})
            seq.sent = upto
        return None

    def _free(self, seq: Sequence) -> None:
        with self.cv:
            if self.active.get(seq.slot) is seq:
                del self.active[seq.slot]

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        if reason in ("length", "stop", "cancelled") and len(seq.text) > seq.sent:
            seq.emit({"text": seq.text[seq.sent:]})
            seq.sent = len(seq.text)
        event = {"finish_reason": reason, "completion_tokens": len(seq.tokens), "prompt_tokens": len(seq.prompt)}
        if error:
            event["error"] = error
        seq.emit(event)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
