"""Continuous-batching decode for Llama-family causal LMs: plain torch, no Ray, no HTTP.

A fixed number of slots each hold one sequence's KV cache (``[layers][slots, kv_heads, max_len, head_dim]``).
A request is prefilled into a free slot, joins the running batch at the next decode step and leaves it the
step it ends (EOS, ``max_tokens``, a stop string, or cancellation), which frees the slot for the next one.

On a GPU the decode step is captured in CUDA graphs, one per batch bucket: a step is one graph replay plus a
few sampling kernels, with no host sync inside. With Triton (``serve/kernels.py``) each row's attention reads
only its own cache length and rotary, the cache write, residual adds, norms and SiLU are fused; without it,
the step uses SDPA over a padded span and gets one graph per (batch, span) bucket. With graphs, prompts
admitted together are prefilled packed into one sequence (each attends only to itself): one graph replay
padded to a length bucket; without (the CPU), one eager forward over the right-padded prompts. The engine thread keeps the device one step ahead of the
host: it launches step k+1 from step k's tokens (which never leave the device) and only then waits for step
k-1's tokens to hand them out and decide who finished, so Python work (and the GIL held by the server's
other threads) overlaps the device. A sequence that ended at step k still rides along in the steps already
queued; their tokens for it are dropped.

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

from serve import kernels

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

    def __init__(self, model, slots: int, max_len: int, use_kernels: bool | None = None):
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
        shape = (slots + 1, self.kv_heads, max_len, self.head_dim)  # + a spare row for prefill padding
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        # q/k/v and gate/up as one matmul each: the modules' weights become views into the fused tensors
        self.qkv = [_fuse(ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj) for ly in self.layers]
        self.gate_up = [_fuse(ly.mlp.gate_proj, ly.mlp.up_proj) for ly in self.layers]
        pos = torch.arange(max_len, device=self.device)
        dummy = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = model.model.rotary_emb(dummy, pos[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        self.arange = pos
        # the Triton decode step (GPU): fused rotary + cache write, per-row-length attention, fused norms
        fusable = getattr(cfg, "hidden_act", "silu") == "silu" and all(
            hasattr(m, "variance_epsilon") for ly in self.layers for m in (ly.input_layernorm,
                                                                          ly.post_attention_layernorm))
        self.kernels = (kernels.available(self.device) if use_kernels is None else use_kernels) and fusable
        self.attention: dict[str, int] = {}  # decode_attention's block/chunk/warps (its defaults unless set)

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

    def prefill(self, ids: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                last: torch.Tensor) -> torch.Tensor:
        """Several prompts packed into one sequence ``ids`` [T]: token t belongs to prompt ``seg[t]``, sits at
        position ``pos[t]`` of cache row ``slot[t]``, and attends only to earlier tokens of its own prompt.
        Returns logits [K, vocab] at the packed indices ``last`` [K] (each prompt's last token). Padding is a
        segment of its own writing into the spare cache row (index ``slots``), which no decode step reads.
        One shape for any mix of prompts: what the prefill graphs capture."""
        idx = torch.arange(seg.shape[0], device=seg.device)
        mask = ((idx[None, :] <= idx[:, None]) & (seg[None, :] == seg[:, None]))[None, None]  # [1, 1, T, T]
        return self._finish(self._prompts(ids[None], pos[None], slot[None], mask)[0, last])

    def prefill_rows(self, ids: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts ``ids`` [n, T] into ``slots`` [n], one row each (causal attention, no T x T mask
        over every prompt: the eager path's cheaper shape); logits [n, vocab] at each last prompt token."""
        n, t = ids.shape
        pos = self.arange[:t].expand(n, t)
        h = self._prompts(ids, pos, slots[:, None].expand(n, t), None)
        return self._finish(h[torch.arange(n, device=h.device), lengths - 1])

    def _prompts(self, ids: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor | None):
        """Prompt tokens ``ids`` [n, T] at cache positions ``pos`` of rows ``slot`` (both [n, T]) through the
        layers, writing their k/v to the cache; ``mask`` [.., T, T] or None for causal. Returns h [n, T, hidden]."""
        n, t = ids.shape
        h = self.model.model.embed_tokens(ids)
        rot = self._rotary(pos)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, self._norm(layer.input_layernorm, h), rot)
            self.k[i][slot, :, pos] = k
            self.v[i][slot, :, pos] = v
            o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=self.gqa)
            h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(n, t, -1))
            h = h + self._mlp(i, self._norm(layer.post_attention_layernorm, h))
        return h

    def pack(self, prompts: list[list[int]], slots: list[int], width: int | None = None,
             count: int | None = None) -> torch.Tensor:
        """Host-side inputs of ``prefill`` for ``prompts`` into cache rows ``slots``, padded to ``width`` tokens
        and ``count`` prompts: one int64 tensor [4 * width + count] (ids, seg, pos, slot, last)."""
        total = sum(len(p) for p in prompts)
        width, count = width or total, count or len(prompts)
        ids, seg, pos, slot, last = [], [], [], [], []
        for j, (p, s) in enumerate(zip(prompts, slots, strict=True)):
            ids += p
            seg += [j] * len(p)
            pos += range(len(p))
            slot += [s] * len(p)
            last.append(len(ids) - 1)
        pad = width - total
        ids += [0] * pad
        seg += [-1] * pad
        pos += [j % self.max_len for j in range(pad)]
        slot += [self.slots] * pad
        return torch.tensor(ids + seg + pos + slot + last + [0] * (count - len(prompts)))

    @staticmethod
    def unpack(buf: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
        """``prefill``'s arguments as views of a packed buffer (see ``pack``)."""
        return tuple(buf[i * width:(i + 1) * width] for i in range(4)) + (buf[4 * width:],)

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """One token for slots 0..B-1 (``ids``/``pos`` [B]); attention reads the first ``span`` cache positions
        (on the kernel path each row reads its own ``pos + 1`` and ``span`` is ignored)."""
        if self.kernels:
            return self._decode_kernels(ids, pos)
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

    def _decode_kernels(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The decode step with the Triton kernels: per layer q/k/v, rotary + cache write, attention over each
        row's length, o_proj, residual add + RMSNorm, gate/up, SiLU * up, down, residual add + next RMSNorm."""
        b = ids.shape[0]
        h = self.model.model.embed_tokens(ids)  # [B, hidden], updated in place by add_rms_norm
        x = self._norm(self.layers[0].input_layernorm, h)
        norms = [ly.post_attention_layernorm for ly in self.layers]
        following = [ly.input_layernorm for ly in self.layers[1:]] + [self.model.model.norm]
        for i, layer in enumerate(self.layers):
            q = kernels.rope_cache(F.linear(x, *self.qkv[i]), self.cos, self.sin, pos, self.k[i], self.v[i],
                                   self.heads, self.kv_heads)
            o = kernels.decode_attention(q, self.k[i], self.v[i], pos, **self.attention)
            x = kernels.add_rms_norm(h, layer.self_attn.o_proj(o.view(b, -1)), norms[i].weight,
                                     norms[i].variance_epsilon)
            up = kernels.silu_mul(F.linear(x, *self.gate_up[i]))
            x = kernels.add_rms_norm(h, layer.mlp.down_proj(up), following[i].weight, following[i].variance_epsilon)
        return self.model.lm_head(x).float()


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
    decode step and the prefill (default: on when the model is on a GPU); ``compile_step``: torch.compile the
    step first; ``use_kernels``: the Triton decode step (default: on where Triton runs for the device).
    """

    PIPELINE = 2  # decode steps queued on the device while the host hands out tokens
    PACK = 8  # the most prompts prefilled together in one packed forward
    PACK_TOKENS = 2048  # ... and the most tokens (at least max_len)

    def __init__(self, model, tokenizer, slots: int = 8, max_len: int = 1024, cuda_graphs: bool | None = None,
                 compile_step: bool = False, use_kernels: bool | None = None):
        self.tokenizer = tokenizer
        self.eos = set(_eos_ids(model, tokenizer))
        self.slots, self.max_len = slots, max_len
        self.dec = _Decoder(model, slots, max_len, use_kernels)
        self.device = self.dec.device
        self.vocab = model.config.vocab_size
        self.graphs_on = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # Optional torch.compile of the step (one dynamic-shape compile for every bucket). Off by default: for
        # a 32-layer model it did not finish within 3.5 minutes of replica start on an H100 (BENCHMARKS.md).
        self.step = self.dec.decode
        if compile_step:
            self.step = torch.compile(self.dec.decode, dynamic=True, fullgraph=True)
        self.batch_buckets = _buckets(slots, 1)
        # SDPA reads a padded span of the cache: a few span buckets; the kernels read each row's own length
        self.span_buckets = [max_len] if self.dec.kernels else _buckets(max_len, min(256, max_len))
        # packed prefill widths: every 32 tokens up to 512 (single prompts pad little), then every 128 up to
        # the pack's capacity (a burst of arrivals prefills PACK prompts per forward)
        self.pack_tokens = max(max_len, self.PACK_TOKENS)
        self.prefill_buckets = sorted({min(n, self.pack_tokens) for n in [*range(32, 512, 32),
                                                                          *range(512, self.pack_tokens + 128, 128)]})
        # decode inputs live on the device between steps: the next step reads the last step's tokens there
        self.ids = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.seen = torch.zeros(slots, self.vocab, dtype=torch.bool, device=self.device)  # repetition penalty
        # a prefill's packed inputs (``_Decoder.pack``) in one device buffer: a single copy per prefill
        self.pf_buf = torch.zeros(4 * self.pack_tokens + self.PACK, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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

    def _prefill_inputs(self, t: int) -> tuple[torch.Tensor, ...]:
        """The prefill graph's inputs for ``t`` packed tokens: views of the prefill buffer."""
        return self.dec.unpack(self.pf_buf[:4 * t + self.PACK], t)

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

        def capture(fn):
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                out = fn()
            return g, out

        with torch.inference_mode():
            # largest first: later graphs reuse its pool memory
            for t in reversed(self.prefill_buckets):
                self.prefill_graphs[t] = capture(lambda t=t: self.dec.prefill(*self._prefill_inputs(t)))
            for span in reversed(self.span_buckets):
                for b in reversed(self.batch_buckets):
                    self.graphs[(b, span)] = capture(lambda b=b, span=span: self.step(self.ids[:b], self.pos[:b],
                                                                                       span))

        torch.cuda.synchronize()
        log.info("decode engine: %d decode and %d prefill CUDA graphs captured in %.1f s (Triton step: %s)",
                 len(self.graphs), len(self.prefill_graphs), time.perf_counter() - t0, self.dec.kernels)

    def _decode_logits(self, b: int, span: int) -> torch.Tensor:
        if self.graphs_on:
            g, out = self.graphs[(b, span)]
            g.replay()
            return out
        return self.step(self.ids[:b], self.pos[:b], span)

    def _tensor(self, values: list[int] | list[float]) -> torch.Tensor:
        """A small host list on the device without blocking the host (pinned, asynchronous copy)."""
        t = torch.tensor(values)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ sampling (on the device)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence | None], slots: torch.Tensor | None) -> torch.Tensor:
        """Next tokens for rows of ``logits``; ``seqs[i]`` is row i's sequence (None: an idle slot)."""
        live = [s for s in seqs if s is not None]
        if any(s.params.repetition_penalty != 1.0 for s in live):
            pen = self._tensor([s.params.repetition_penalty if s else 1.0 for s in seqs])
            seen = self.seen[slots] if slots is not None else self.seen[: len(seqs)]
            penalized = torch.where(logits > 0, logits / pen[:, None], logits * pen[:, None])
            logits = torch.where(seen, penalized, logits)
        greedy = logits.argmax(-1)
        if not any(s.params.temperature > 0 for s in live):
            return greedy
        temp = self._tensor([s.params.temperature if s and s.params.temperature > 0 else 1.0 for s in seqs])
        probs = torch.softmax(logits / temp[:, None], dim=-1)
        if any(s.params.top_p < 1.0 for s in live):
            top_p = self._tensor([s.params.top_p if s else 1.0 for s in seqs])
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        noise = torch.empty_like(probs).exponential_()
        for i, s in enumerate(seqs):
            if s is not None and s.generator is not None:
                noise[i] = torch.empty(probs.shape[-1], device=probs.device).exponential_(generator=s.generator)
        sampled = (probs / noise).argmax(-1)  # exponential race: a draw from probs
        hot = self._tensor([bool(s and s.params.temperature > 0) for s in seqs])
        return torch.where(hot, sampled, greedy)

    # ------------------------------------------------------------------ the loop

    def _take(self) -> list[Sequence]:
        """Waiting requests assigned to free slots (and registered as active)."""
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
        return take

    def _packs(self, seqs: list[Sequence], limit: int) -> list[list[Sequence]]:
        """Consecutive groups of at most PACK prompts and ``limit`` tokens: one prefill each."""
        out: list[list[Sequence]] = []
        for s in seqs:
            if out and len(out[-1]) < self.PACK and sum(len(x.prompt) for x in out[-1]) + len(s.prompt) <= limit:
                out[-1].append(s)
            else:
                out.append([s])
        return out

    def _prefill_logits(self, group: list[Sequence]) -> torch.Tensor:
        """Logits at each prompt's last token: with graphs, the group packed into the prefill buffer and the
        graph of its width bucket replayed; without, one eager forward over the right-padded prompts."""
        prompts, rows = [s.prompt for s in group], [s.slot for s in group]
        if not self.graphs_on:
            width = max(len(p) for p in prompts)
            ids = self._tensor([p + [0] * (width - len(p)) for p in prompts])
            return self.dec.prefill_rows(ids, self._tensor([len(p) for p in prompts]), self._tensor(rows))
        width = self._bucket(self.prefill_buckets, sum(len(p) for p in prompts))
        buf = self.dec.pack(prompts, rows, width, self.PACK)
        self.pf_buf[:buf.shape[0]].copy_(buf.pin_memory(), non_blocking=True)
        g, logits = self.prefill_graphs[width]
        g.replay()
        return logits[:len(group)]

    def _new_rows(self, group: list[Sequence]) -> torch.Tensor:
        """The new sequences' slots on the device; their repetition-penalty rows start from their prompts."""
        slots = self._tensor([s.slot for s in group])
        if any(s.params.repetition_penalty != 1.0 for s in group):
            self.seen[slots] = False
            for s in group:
                self.seen[s.slot, self._tensor(s.prompt)] = True
        return slots

    def _start(self, group: list[Sequence], slots: torch.Tensor, first: torch.Tensor) -> None:
        """Newly prefilled sequences join the decode batch: first token and position on the device."""
        self.ids[slots] = first
        self.pos[slots] = self._tensor([len(s.prompt) for s in group])
        self.seen[slots, first] = True
        for s in group:
            self.pos_host[s.slot] = len(s.prompt)

    def _prefill(self, group: list[Sequence]) -> torch.Tensor:
        """Prefill ``group`` in one forward; returns their first tokens on the device."""
        slots = self._new_rows(group)
        first = self._sample(self._prefill_logits(group), group, slots)
        self._start(group, slots, first)
        return first

    def _rows(self, decoding: dict[int, Sequence]) -> tuple[int, int, list[Sequence | None]]:
        """The decode step's batch bucket, span bucket, and each row's sequence (None: an idle slot)."""
        b = self._bucket(self.batch_buckets, max(decoding) + 1)
        span = self._bucket(self.span_buckets, max(self.pos_host[s] for s in decoding) + 1)
        return b, span, [decoding.get(i) for i in range(b)]

    def _advance(self, b: int, nxt: torch.Tensor, decoding: dict[int, Sequence]) -> None:
        """After a decode step: each row's next input token and position."""
        self.ids[:b] = nxt
        self.pos[:b] = torch.clamp(self.pos[:b] + 1, max=self.max_len - 1)
        if any(s.params.repetition_penalty != 1.0 for s in decoding.values()):
            self.seen[self.dec.arange[:b], nxt] = True
        for s in decoding:
            self.pos_host[s] += 1

    def _step(self) -> tuple[list[tuple], bool]:
        """Queue one iteration's device work: the new prompts' prefills, then one decode step over every active
        sequence. Returns the hand-out entries in device order and whether a decode step was launched."""
        take = self._take()
        groups = self._packs(take, self.pack_tokens) if self.graphs_on else [take] if take else []
        entries = [self._to_host(g, self._prefill(g)) for g in groups]
        if not self.active:
            return entries, False
        decoding = dict(self.active)
        b, span, seqs = self._rows(decoding)
        nxt = self._sample(self._decode_logits(b, span), seqs, None)
        self._advance(b, nxt, decoding)
        entries.append(self._to_host(seqs, nxt))
        return entries, True

    def _to_host(self, seqs: list[Sequence | None], tokens: torch.Tensor):
        """Queue the copy of ``tokens`` to the host; returns (seqs, host tensor, event to wait on)."""
        n = tokens.shape[0]
        if self.device.type != "cuda":
            return seqs, tokens.clone(), None
        buf = torch.empty(n, dtype=tokens.dtype, pin_memory=True)  # the host allocator reuses it once copied
        buf.copy_(tokens, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return seqs, buf, ev

    def _loop(self) -> None:
        """Admit, launch a step, then hand out all but the newest queued work: the device always has the
        next step queued while the host hands out tokens and decides who finished."""
        torch.set_grad_enabled(False)
        queued: deque = deque()  # (seqs, host tokens, event) in device order: prefills and decode steps
        last = time.perf_counter()
        try:
            with torch.inference_mode():
                while True:
                    with self.cv:
                        while not self.stopped and not self.waiting and not self.active and not queued:
                            self.cv.wait()
                        if self.stopped:
                            break
                    entries, launched = self._step()
                    queued.extend(entries)
                    keep = self.PIPELINE - 1 if launched else 0
                    while len(queued) > keep:
                        seqs, host, ev = queued.popleft()
                        if ev is not None:
                            ev.synchronize()
                        self._hand_out(seqs, host.tolist())
                    if launched:
                        now = time.perf_counter()
                        self.steps.append((len(self.active), now - last))
                        last = now
                    else:
                        last = time.perf_counter()
                for seqs, host, ev in queued:
                    if ev is not None:
                        ev.synchronize()
                    self._hand_out(seqs, host.tolist())
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
