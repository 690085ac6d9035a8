"""Continuous-batching decode over a paged KV cache: plain torch, no Ray, no HTTP.

Requests wait in a queue until the cache has blocks for their prompt (``serve/blocks.py``: taken on demand,
shared between prompts with the same prefix); a running sequence takes a block each ``block_size`` tokens and
gives them all back when it ends. Each step is one forward over a packed batch: the next token of every running
sequence and a chunk of the prompts being prefilled (up to ``prefill_chunk`` tokens while others decode, so a
long prompt never stalls them; more when nothing decodes). Requests for different LoRA adapters of the base share
the step (``serve/lora.py``). On a GPU the step is a CUDA graph per token-count bucket (Triton kernels inside,
``serve/kernels.py``) plus the sampling kernels, with no host sync.

The engine thread keeps the device one step ahead of the host: it launches step k+1 (whose decoding tokens are
step k's samples, which never leave the device) before it waits for step k's tokens to hand them out and decide
who finished, so Python work (and the GIL held by the server's other threads) overlaps the device. A sequence
that ended at step k still rides along in the step already queued; its blocks are given back once that step
is handed out. When the cache runs out, the newest running sequence is preempted: its blocks go back and it
waits again with its generated tokens appended to its prompt (recomputed when it is readmitted).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from serve import kernels
from serve.blocks import BlockPool, block_keys
from serve.decoder import Batch, Decoder
from serve.families import EngineUnsupported, describe
from serve.lora import AdapterPool

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers before 0.21.1: the engine decodes a window of tokens instead
    DecodeStream = None

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineUnsupported", "Sampling", "Sequence", "check_supported"]


def check_supported(config_or_model) -> None:
    """EngineUnsupported unless the engine implements this model (a transformers model or its config)."""
    describe(config_or_model if hasattr(config_or_model, "config") else _Wrapped(config_or_model))


class _Wrapped:
    def __init__(self, config):
        self.config = config


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
    """One request in the engine. ``emit(event)`` is called from the engine thread with ``{"text": piece}`` while
    it decodes and one final ``{"finish_reason", "completion_tokens", "prompt_tokens"}``."""

    prompt: list[int]
    params: Sampling
    emit: Callable[[dict[str, Any]], None]
    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    text: str = ""
    sent: int = 0  # characters of text handed out
    prefix_off: int = 0
    read_off: int = 0
    generator: torch.Generator | None = None
    # the engine's bookkeeping
    row: int = -1  # block-table row while running
    slot: int = -1  # adapter slot while running
    blocks: list[int] = field(default_factory=list)
    fed: int = 0  # positions whose k/v are written or queued
    sampled: int = 0  # tokens sampled or queued to be
    in_flight: int = 0  # launched steps not handed out yet
    paused: bool = False  # preempted: waits for its steps in flight, then waits in the queue again
    last_emit: float = 0.0
    submitted: float = 0.0  # perf_counter() when it reached the engine
    first_token_at: float = 0.0  # perf_counter() when its first token was handed out
    stream: Any = None  # the tokenizer's streaming decoder state
    reason: str | None = None
    error: str | None = None

    @property
    def context(self) -> list[int]:
        """What is prefilled: the prompt, and after a preemption the tokens generated before it."""
        return self.prompt + self.tokens if self.resumed else self.prompt

    resumed: bool = False

    def cancel(self) -> None:
        """The client is gone: its blocks are freed at the next step."""
        self.cancelled = True


def _buckets(limit: int) -> list[int]:
    """Token counts a step is padded to (a CUDA graph each): powers of two to 16, then every 16 to 128, every 32 to
    256, every 64 to 1024, every 256 above."""
    out, n = [1, 2, 4, 8], 16
    while n < limit:
        out.append(n)
        n += 16 if n < 128 else 32 if n < 256 else 64 if n < 1024 else 256
    return sorted({b for b in out if b < limit} | {limit})


class Engine:
    """Schedules requests over the paged cache and runs the step loop on its own thread.

    ``model``: a transformers causal LM of a supported family in eval mode on its device. ``max_seqs``: the most
    sequences running together; ``max_len``: prompt + new tokens of one sequence. The cache holds ``num_blocks``
    blocks of ``block_size`` positions, or on a GPU (``num_blocks`` None) as many as fit in
    ``gpu_memory_utilization`` of the device's memory once the weights and the largest step are accounted for.
    ``adapters``: served name -> PEFT directory, up to ``max_adapters`` resident on the device.
    """

    PIPELINE = 3  # steps queued on the device while the host hands out tokens (slack for the host's hiccups)

    def __init__(self, model, tokenizer, max_seqs: int = 8, max_len: int = 1024, *, num_blocks: int | None = None,
                 block_size: int | None = None, gpu_memory_utilization: float = 0.9, prefill_chunk: int = 512,
                 max_prefill: int = 2048, cuda_graphs: bool | None = None, use_kernels: bool | None = None,
                 batch_invariant: bool = False, prefix_caching: bool = True, adapters: dict[str, str] | None = None,
                 max_adapters: int = 8, stream_interval: float = 0.0, stream_items_per_s: float = 0.0):
        self.fam = describe(model)
        self.tokenizer, self.eos = tokenizer, set(_eos_ids(model, tokenizer))
        self.max_seqs, self.max_len = max_seqs, max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.kernels = kernels.available(self.device) if use_kernels is None else use_kernels
        if batch_invariant and not self.kernels:
            raise EngineUnsupported("serve.batch_invariant needs the Triton kernels (a GPU)")
        self.graphs_on = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # Without the kernels (the CPU) a sequence's cache is one block: attention reads views, not gathers
        self.block_size = block_size or (32 if self.kernels else max_len)
        self.prefill_chunk, self.max_prefill = prefill_chunk, max(max_prefill, prefill_chunk)
        self.max_tokens_step = max(max_seqs + prefill_chunk, self.max_prefill) if self.graphs_on else 1 << 30
        self.stream_interval, self.stream_rate = stream_interval, stream_items_per_s
        self.interval = stream_interval  # this hand-out's: the floor, or longer when many sequences stream
        self.adapters: AdapterPool | None = None
        self.adapter_slots = max_adapters if adapters else 0
        sizing = num_blocks or (self._fit_blocks(model, gpu_memory_utilization) if self.device.type == "cuda"
                                else max_seqs * -(-max_len // self.block_size))
        self.dec = Decoder(model, self.fam, sizing + 1, self.block_size, max_len, self.kernels, batch_invariant)
        if adapters:
            self.adapters = AdapterPool(adapters, max_adapters, self.dec.lora_shapes(), self.device, self.dtype)
            self.dec.adapters = self.adapters
        self.pool = BlockPool(sizing + 1, self.block_size, prefix_caching)
        self.max_blocks = -(-max_len // self.block_size)
        self.table = np.zeros((max_seqs, self.max_blocks), np.int32)  # host copy of the block table
        self.dec.set_block_table(torch.zeros(max_seqs, self.max_blocks, dtype=torch.int32, device=self.device))
        self.table_updates: list[tuple[int, int, int]] = []
        self.free_rows = list(range(max_seqs - 1, -1, -1))
        self.last = torch.zeros(max_seqs, dtype=torch.long, device=self.device)  # each row's last sampled token
        self.seen: torch.Tensor | None = None  # [max_seqs, vocab] for repetition penalties, made on first use
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.cv = threading.Condition()
        self.stopped = False
        self.steps: deque[tuple[int, float]] = deque(maxlen=2000)  # (sequences, seconds) per step
        self.counters = {"steps": 0, "tokens_prefilled": 0, "tokens_generated": 0, "preemptions": 0}
        self.waited = 0.0  # seconds the loop spent waiting for the device (the rest: host work)
        self.looped = 0.0
        self.idle = 0.0  # seconds the loop had nothing to run (no request in the engine)
        self.idle_since: float | None = None  # when the idle stretch going on now began
        self.first_token: deque[tuple[float, float]] = deque(maxlen=4000)  # (when, seconds from submit) per request
        self.buckets = _buckets(min(self.max_tokens_step, 1 << 16)) if self.graphs_on else []
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, Batch]] = {}
        self.buf = torch.zeros(self._width(self.buckets[-1]) if self.buckets else 0, dtype=torch.long,
                               device=self.device)
        if self.graphs_on:
            self._capture()
        log.info("decode engine: %s", self.describe())
        self.thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, prompt: list[int], params: Sampling, emit: Callable[[dict[str, Any]], None],
               adapter: str | None = None) -> Sequence:
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"engine's {self.max_len} positions")
        if adapter is not None and (self.adapters is None or adapter not in self.adapters):
            raise KeyError(adapter)
        seq = Sequence(list(prompt), params, emit, adapter, submitted=time.perf_counter())
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
        return {"active": len(self.running), "waiting": len(self.waiting), "slots": self.max_seqs,
                "blocks_free": self.pool.available()}

    def describe(self) -> str:
        tokens = (self.pool.count - 1) * self.block_size
        gib = self.dec.kv_bytes_per_block() * (self.pool.count - 1) / 2**30
        return (f"{self.fam.name}, KV cache {self.pool.count - 1:,} blocks of {self.block_size} positions "
                f"({tokens:,} tokens, {gib:.2f} GiB), up to {self.max_seqs} sequences of {self.max_len} positions, "
                f"prefill chunks of {self.prefill_chunk} tokens, {'Triton' if self.kernels else 'PyTorch'} step"
                + (f", {len(self.graphs)} CUDA graphs" if self.graphs_on else "")
                + (f", {self.adapters.slots} adapter slots" if self.adapters else ""))

    def _idle_total(self) -> float:
        """Idle seconds so far, the stretch going on included (read under the lock the loop updates them in)."""
        with self.cv:
            since = self.idle_since
            return self.idle + (time.perf_counter() - since if since is not None else 0.0)

    def stats(self, window_s: float | None = None) -> dict[str, Any]:
        """What the engine chose and how it runs: the last 500 steps' times, and the time from a request reaching
        the engine to its first token (requests of the last ``window_s`` seconds, else the last 500)."""
        since = time.perf_counter() - window_s if window_s else float("-inf")
        firsts = [d for t, d in self.first_token if t >= since][-500:]
        recent = list(self.steps)[-500:]
        out = {"family": self.fam.name, "max_sequences": self.max_seqs, "max_len": self.max_len,
               "kv_bytes": self.dec.kv_bytes_per_block() * (self.pool.count - 1), **self.pool.report(),
               **self.load(), **self.counters, "cuda_graphs": len(self.graphs), "kernels": self.kernels,
               **_percentiles("step_ms", [t for _, t in recent], (50, 90)),
               "mean_sequences_per_step": round(sum(n for n, _ in recent) / len(recent), 1) if recent else None,
               "device_wait_share": round(self.waited / self.looped, 3) if self.looped else None,
               "idle_s": round(self._idle_total(), 3), **_percentiles("engine_ttft_ms", firsts)}
        if self.adapters:
            out.update(self.adapters.report())
        return out

    # ------------------------------------------------------------------ sizing and graphs

    def _fit_blocks(self, model, utilization: float) -> int:
        """Blocks that fit in ``utilization`` of the GPU once the weights and a largest step's activations are in."""
        fam = describe(model)
        per_block = 2 * len(model.model.layers) * fam.kv_heads * self.block_size * fam.head_dim * self.dtype.itemsize
        free, total = torch.cuda.mem_get_info(self.device)
        tokens = min(self.max_tokens_step, 1 << 16)
        cfg = model.config
        # the largest step's activations: hidden states, q/k/v, the MLP's gate/up and the sampled logits (float32)
        act = tokens * (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * self.dtype.itemsize
        act += min(tokens, self.max_seqs) * cfg.vocab_size * 12
        budget = utilization * total - (total - free) - 2 * act - (256 << 20)
        blocks = int(budget // per_block)
        if blocks < 2 * -(-self.max_len // self.block_size):
            raise EngineUnsupported(f"serve.gpu_memory_utilization {utilization}: {budget / 2**30:.1f} GiB left for "
                                    f"the KV cache, less than two sequences of {self.max_len} positions")
        return blocks

    def _width(self, t: int) -> int:
        """Length of the step buffer for ``t`` tokens: 9 arrays of t, the sampling rows, the LoRA boundaries."""
        return 9 * t + min(t, self.max_seqs) + self.adapter_slots + 1

    def _bucket(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def _views(self, buf: torch.Tensor, t: int, lora: bool) -> Batch:
        """The step's inputs as views of ``buf`` laid out for ``t`` tokens (see ``_pack``)."""
        s = min(t, self.max_seqs)
        a = [buf[i * t:(i + 1) * t] for i in range(9)]
        rest = buf[9 * t:]
        slots = self.adapter_slots
        return Batch(ids=a[0], pos=a[1], slot=a[2], row=a[3], from_row=a[4], tile_row=a[5], tile_start=a[6],
                     tile_len=a[7], sample_idx=rest[:s], perm=a[8] if lora else None,
                     seg_start=rest[s:s + slots + 1] if lora else None)

    def _capture(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        variants = [False, True] if self.adapters else [False]
        with torch.inference_mode():
            for t in reversed(self.buckets):  # largest first: later graphs reuse its pool memory
                for lora in variants:
                    batch = self._views(self.buf, t, lora)
                    with torch.cuda.stream(stream):
                        self.dec.forward(batch, self.last)
                    torch.cuda.current_stream().wait_stream(stream)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                        out = self.dec.forward(batch, self.last)
                    self.graphs[(t, lora)] = (g, out, batch)
        torch.cuda.synchronize()
        log.info("decode engine: %d CUDA graphs captured in %.1f s", len(self.graphs), time.perf_counter() - t0)

    # ------------------------------------------------------------------ scheduling

    def _admit(self) -> None:
        """Waiting requests into the running set while rows and blocks last (a request that cannot get its
        adapter yet stays in line; the ones behind it may pass)."""
        # room kept for running sequences to grow (fewer preemptions); none where a block holds a whole sequence
        reserve = 0 if self.block_size >= self.max_len else (self.pool.count - 1) // 100
        with self.cv:
            queue = list(self.waiting)
        for seq in queue:
            if seq.cancelled:
                self._end(seq, "cancelled")
                self._dequeue(seq)
                continue
            if not self.free_rows:
                break
            ctx = seq.context
            need = self.pool.blocks_for(len(ctx))
            if self.pool.available() < need + (reserve if self.running else 0):
                break
            if seq.adapter is not None:
                slot = self.adapters.acquire(seq.adapter)
                if slot is None:
                    continue
                seq.slot = slot
            self._dequeue(seq)
            self._start(seq, ctx)

    def _dequeue(self, seq: Sequence) -> None:
        with self.cv:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass

    def _start(self, seq: Sequence, ctx: list[int]) -> None:
        """Rows and blocks for an admitted sequence: cached prefix blocks shared, the rest of the prompt taken."""
        seq.row = self.free_rows.pop()
        full = (len(ctx) - 1) // self.block_size  # the last prompt token is always computed (it samples)
        seq.blocks = self.pool.match(block_keys(ctx[:full * self.block_size], self.block_size, seq.adapter))
        seq.fed = len(seq.blocks) * self.block_size
        self.counters["prefix_tokens_reused"] = self.counters.get("prefix_tokens_reused", 0) + seq.fed
        while len(seq.blocks) < self.pool.blocks_for(len(ctx)):
            seq.blocks.append(self.pool.take())
        for j, b in enumerate(seq.blocks):
            self._table(seq.row, j, b)
        seq.sampled = len(seq.tokens)
        if seq.params.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.max_seqs, self.dec.model.config.vocab_size, dtype=torch.bool,
                                        device=self.device)
            self.seen[seq.row] = False
            self.seen[seq.row, self._tensor(ctx)] = True
        self.running.append(seq)

    def _table(self, row: int, j: int, block: int) -> None:
        self.table[row, j] = block
        self.table_updates.append((row, j, block))

    def _grow(self, seq: Sequence) -> bool:
        """A block for the position ``seq`` writes next; False when none is left (after preempting others)."""
        if seq.fed // self.block_size < len(seq.blocks):
            return True
        if self.pool.available() == 0:  # the newest other sequence makes room (once its steps in flight are out)
            victim = next((s for s in reversed(self.running) if s is not seq and not s.paused), None)
            if victim is not None:
                self._preempt(victim)
            if self.pool.available() == 0:
                return False
        seq.blocks.append(self.pool.take())
        self._table(seq.row, len(seq.blocks) - 1, seq.blocks[-1])
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Stop scheduling ``seq``; once its steps in flight are handed out its blocks go back and it waits again."""
        seq.paused = True
        self.counters["preemptions"] += 1
        if seq.in_flight == 0:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Give back a sequence's row, blocks and adapter slot; a paused one goes back to the front of the queue."""
        if seq in self.running:
            self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
        if seq.row >= 0:
            self.free_rows.append(seq.row)
            seq.row = -1
        if seq.slot >= 0:
            self.adapters.release(seq.slot)
            seq.slot = -1
        if seq.paused and not seq.done:
            seq.paused, seq.resumed, seq.fed = False, True, 0
            with self.cv:
                self.waiting.appendleft(seq)

    def _plan(self) -> tuple[list[Sequence], list[tuple[Sequence, int, int]]]:
        """This step's decoding sequences and prompt chunks (sequence, first position, tokens)."""
        decode, chunks = [], []
        for seq in list(self.running):
            if seq.paused or seq.done:
                continue
            if seq.cancelled and seq.fed < len(seq.context):
                self._end(seq, "cancelled")
                continue
            ctx_len = len(seq.context)
            if seq.fed >= ctx_len and seq.sampled < seq.params.max_tokens and self._grow(seq):
                decode.append(seq)
        # while others decode, one prompt gets at most prefill_chunk tokens of a step (a long prompt never stalls
        # them for long); many prompts together fill up to max_prefill (a burst of arrivals is prefilled in few steps)
        cap = self.prefill_chunk if decode else self.max_prefill
        budget = min(self.max_prefill, self.max_tokens_step - len(decode))
        if self.graphs_on and budget > 0:  # the step is padded to a bucket anyway: prompts fill the padding
            budget = self._bucket(len(decode) + budget) - len(decode)
        for seq in self.running:
            ctx_len = len(seq.context)
            if seq.paused or seq.done or seq.fed >= ctx_len or budget <= 0:
                continue
            n = min(ctx_len - seq.fed, cap, budget)
            chunks.append((seq, seq.fed, n))
            budget -= n
        return decode, chunks

    # ------------------------------------------------------------------ one step

    def _pack(self, decode: list[Sequence], chunks: list[tuple[Sequence, int, int]], t: int
              ) -> tuple[np.ndarray, list[Sequence], list[tuple[int, int, int, int]]]:
        """The step's host buffer (layout of ``_views``), the sequences that sample (in sampling-row order) and
        the per-sequence segments (row, first token, tokens, first position)."""
        n_dec = len(decode)
        width = self._width(t)
        buf = np.zeros(width, np.int64)
        a = [buf[i * t:(i + 1) * t] for i in range(9)]
        ids, pos, slot, row, from_row, tile_row, tile_start, tile_len, adapter = a
        bs = self.block_size
        segments, samplers, sample_idx, tiles = [], [], [], []
        tok_adapter = np.full(t, -1, np.int64)
        if decode:  # one token each: whole columns at once (the host's per-step work at 100+ sequences)
            fed, rows = [s.fed for s in decode], [s.row for s in decode]
            pos[:n_dec], row[:n_dec], from_row[:n_dec], tile_row[:n_dec], tile_len[:n_dec] = fed, rows, 1, rows, 1
            slot[:n_dec] = [s.blocks[p // bs] * bs + p % bs for s, p in zip(decode, fed, strict=True)]
            tile_start[:n_dec] = np.arange(n_dec)
            tok_adapter[:n_dec] = [s.slot for s in decode]
            segments += [(r, i, 1, p) for i, (r, p) in enumerate(zip(rows, fed, strict=True))]
            samplers += decode
            sample_idx += range(n_dec)
        k = n_dec
        for seq, first, n in chunks:
            ctx = seq.context
            ids[k:k + n] = ctx[first:first + n]
            p = np.arange(first, first + n)
            pos[k:k + n] = p
            row[k:k + n] = seq.row
            blocks = np.asarray(seq.blocks, np.int64)
            slot[k:k + n] = blocks[p // bs] * bs + p % bs
            tok_adapter[k:k + n] = seq.slot
            tiles += [(seq.row, k + j, min(self.dec.tile, n - j)) for j in range(0, n, self.dec.tile)]
            segments.append((seq.row, k, n, first))
            if first + n == len(ctx):
                samplers.append(seq)
                sample_idx.append(k + n - 1)
            k += n
        for j, (r, s, n) in enumerate(tiles, n_dec):
            tile_row[j], tile_start[j], tile_len[j] = r, s, n
        pos[k:] = 0  # padding: position 0 of the reserved block 0
        rest = buf[9 * t:]
        rest[:len(sample_idx)] = sample_idx
        if self.adapters and (tok_adapter >= 0).any():
            order = np.argsort(tok_adapter, kind="stable")
            order = order[tok_adapter[order] >= 0]
            adapter[:len(order)] = order
            counts = np.bincount(tok_adapter[order], minlength=self.adapters.slots)
            s = min(t, self.max_seqs)
            rest[s:s + self.adapters.slots + 1] = np.concatenate([[0], np.cumsum(counts)])
        return buf, samplers, segments

    def _launch(self, decode: list[Sequence], chunks: list[tuple[Sequence, int, int]]):
        """Queue one step's device work; returns (sequences that sample, their tokens on the host, event)."""
        t_real = len(decode) + sum(n for _, _, n in chunks)
        t = self._bucket(t_real) if self.graphs_on else t_real
        host, samplers, segments = self._pack(decode, chunks, t)
        lora = bool(self.adapters) and any(s.slot >= 0 for s in decode + [c[0] for c in chunks])
        self._apply_table_updates()
        if self.graphs_on:
            self.buf[:host.shape[0]].copy_(torch.from_numpy(host).pin_memory(), non_blocking=True)
            g, out, batch = self.graphs[(t, lora)]
            g.replay()
        else:
            dev = torch.from_numpy(host)
            batch = self._views(dev.to(self.device, non_blocking=True) if self.device.type == "cuda" else dev, t,
                                lora)
            batch.segments, batch.blocks = segments, {s.row: s.blocks for s in decode + [c[0] for c in chunks]}
            out = self.dec.forward(batch, self.last)
        for seq, first, n in chunks:
            self._publish(seq, first, n)
            seq.fed += n
        for seq in decode:
            seq.fed += 1
        for seq in samplers:
            seq.sampled += 1
        for seq in {id(s): s for s in decode + [c[0] for c in chunks]}.values():
            seq.in_flight += 1
        self.counters["steps"] += 1
        self.counters["tokens_prefilled"] += t_real - len(decode)
        if not samplers:
            return [], decode + [c[0] for c in chunks], None, None
        rows = self._tensor([s.row for s in samplers])
        nxt = self._sample(out[:len(samplers)], samplers, rows)
        self.last.index_copy_(0, rows, nxt)
        if self.seen is not None and any(s.params.repetition_penalty != 1.0 for s in samplers):
            self.seen[rows, nxt] = True
        return samplers, decode + [c[0] for c in chunks], *self._to_host(nxt)

    def _publish(self, seq: Sequence, first: int, n: int) -> None:
        """Full prompt blocks this chunk completes become findable by later prompts with the same prefix."""
        bs = self.block_size
        done = (first + n) // bs
        if done > first // bs or (first + n) % bs == 0:
            ctx = seq.context
            keys = block_keys(ctx[:done * bs], bs, seq.adapter)
            for j in range(first // bs, done):
                self.pool.publish(seq.blocks[j], keys[j])

    def _apply_table_updates(self) -> None:
        if not self.table_updates:
            return
        u = torch.tensor(self.table_updates, dtype=torch.long)
        self.table_updates = []
        if self.device.type == "cuda":
            u = u.pin_memory().to(self.device, non_blocking=True)
        self.dec.block_table[u[:, 0], u[:, 1]] = u[:, 2].to(torch.int32)

    def _tensor(self, values: list) -> torch.Tensor:
        """A small host list on the device without blocking the host (pinned, asynchronous copy)."""
        t = torch.tensor(values)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], rows: torch.Tensor) -> torch.Tensor:
        """Next tokens for rows of ``logits``: greedy, or temperature / top-p with per-request seeds, and
        repetition penalties over what each sequence has seen."""
        if any(s.params.repetition_penalty != 1.0 for s in seqs):
            pen = self._tensor([s.params.repetition_penalty for s in seqs])
            penalized = torch.where(logits > 0, logits / pen[:, None], logits * pen[:, None])
            logits = torch.where(self.seen[rows], penalized, logits)
        greedy = logits.argmax(-1)
        if not any(s.params.temperature > 0 for s in seqs):
            return greedy
        temp = self._tensor([s.params.temperature if s.params.temperature > 0 else 1.0 for s in seqs])
        probs = torch.softmax(logits / temp[:, None], dim=-1)
        if any(s.params.top_p < 1.0 for s in seqs):
            top_p = self._tensor([s.params.top_p for s in seqs])
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        noise = torch.empty_like(probs).exponential_()
        for i, s in enumerate(seqs):
            if s.generator is not None:
                noise[i] = torch.empty(probs.shape[-1], device=probs.device).exponential_(generator=s.generator)
        sampled = (probs / noise).argmax(-1)  # exponential race: a draw from probs
        hot = self._tensor([s.params.temperature > 0 for s in seqs])
        return torch.where(hot, sampled, greedy)

    def _to_host(self, tokens: torch.Tensor):
        """Queue the copy of ``tokens`` to the host; returns (host tensor, event to wait on)."""
        if self.device.type != "cuda":
            return tokens.clone(), None
        buf = torch.empty(tokens.shape[0], dtype=tokens.dtype, pin_memory=True)
        buf.copy_(tokens, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return buf, ev

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        """Admit, launch a step, then hand out all but the newest queued step: the device always has the next
        step queued while the host hands out tokens and decides who finished."""
        torch.set_grad_enabled(False)
        queued: deque = deque()
        last = time.perf_counter()
        try:
            with torch.inference_mode():
                while True:
                    with self.cv:
                        if not self.stopped and not self.waiting and not self.running and not queued:
                            self.idle_since = t_idle = time.perf_counter()
                            while not self.stopped and not self.waiting and not self.running:
                                self.cv.wait()
                            self.idle += time.perf_counter() - t_idle
                            self.idle_since = None
                            last = time.perf_counter()
                        if self.stopped:
                            break
                    self._admit()
                    decode, chunks = self._plan()
                    launched = bool(decode or chunks)
                    if launched:
                        queued.append(self._launch(decode, chunks))
                    keep = self.PIPELINE - 1 if launched else 0
                    while len(queued) > keep:
                        self._hand_out(*queued.popleft())
                    if not launched and not queued and self.waiting and not self.running:
                        time.sleep(0.002)  # waiting on an adapter load
                    now = time.perf_counter()
                    if launched:
                        self.steps.append((len(decode) + len(chunks), now - last))
                        self.looped += now - last
                    last = now
                for entry in queued:
                    self._hand_out(*entry)
        except Exception as e:  # noqa: BLE001 (every request waiting on the engine gets the error)
            log.exception("decode engine failed")
            with self.cv:
                for s in list(self.running) + list(self.waiting):
                    self._end(s, "error", error=f"{type(e).__name__}: {e}")
                self.running.clear()
                self.waiting.clear()

    def _hand_out(self, samplers: list[Sequence], stepped: list[Sequence], host, ev) -> None:
        """Append each sampling sequence's new token, emit text, end those that are done; give back the blocks
        of sequences whose last step in flight this was."""
        if ev is not None:
            t0 = time.perf_counter()
            ev.synchronize()
            self.waited += time.perf_counter() - t0
        tokens = host.tolist() if host is not None else []
        now = time.perf_counter()
        # every stream's items together stay within stream_items_per_s (each item costs the server's event loop
        # and its Ray hops about the same, however many tokens it carries)
        self.interval = max(self.stream_interval, len(self.running) / self.stream_rate if self.stream_rate else 0.0)
        for seq, tok in zip(samplers, tokens, strict=True):
            if seq.done:
                continue
            if seq.cancelled:
                self._end(seq, "cancelled")
            elif tok in self.eos:
                self._end(seq, "stop")
            else:
                seq.tokens.append(tok)
                self.counters["tokens_generated"] += 1
                if len(seq.tokens) == 1:
                    self.first_token.append((now, now - seq.submitted))
                    seq.first_token_at = now
                reason = self._detokenize(seq, now)
                if reason is None and len(seq.tokens) >= seq.params.max_tokens:
                    reason = "length"
                if reason is not None:
                    self._end(seq, reason)
        for seq in stepped:
            seq.in_flight -= 1
            if seq.in_flight == 0 and (seq.done or seq.paused):
                self._release(seq)

    def _detokenize(self, seq: Sequence, now: float) -> str | None:
        """Incremental detokenization, stop strings, and the text handed out (at most every ``self.interval``
        seconds after the first piece); a tail that could begin a stop string is held back. Returns "stop" when a
        stop string completed."""
        piece = self._piece(seq)
        if not piece:
            return None  # an incomplete character: wait for the next token
        seq.text += piece
        stops = seq.params.stop
        cut = None
        if stops:
            cut = min((i for i in (seq.text.find(s, max(0, seq.sent - len(s))) for s in stops) if i >= 0),
                      default=None)
        if cut is not None:
            seq.text = seq.text[:cut]
            if cut > seq.sent:
                seq.emit({"text": seq.text[seq.sent:cut]})
            seq.sent = cut
            return "stop"
        if seq.sent and now - seq.last_emit < self.interval:
            return None
        hold = max((len(s) - 1 for s in stops), default=0) if stops else 0
        upto = max(seq.sent, len(seq.text) - hold)
        if upto > seq.sent:
            seq.emit({"text": seq.text[seq.sent:upto]})
            seq.sent, seq.last_emit = upto, now
        return None

    def _piece(self, seq: Sequence) -> str:
        """The text the newest token adds: the fast tokenizer's own streaming decoder (one call per token), or a
        window of the last tokens decoded twice."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and DecodeStream is not None:
            if seq.stream is None:
                seq.stream = DecodeStream(skip_special_tokens=True)
                for t in seq.tokens[:-1]:  # after a preemption the stream starts over from the tokens so far
                    seq.stream.step(backend, t)
            return seq.stream.step(backend, seq.tokens[-1]) or ""
        tok = self.tokenizer
        prefix = tok.decode(seq.tokens[seq.prefix_off:seq.read_off], skip_special_tokens=True)
        full = tok.decode(seq.tokens[seq.prefix_off:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        seq.prefix_off, seq.read_off = seq.read_off, len(seq.tokens)
        return full[len(prefix):]

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Finish ``seq`` (its blocks go back once its steps in flight are handed out) and send its last event."""
        if seq.done:
            return
        seq.done = True
        if seq.in_flight == 0 and seq.row >= 0:
            self._release(seq)
        elif seq.row < 0:
            self._dequeue(seq)
        if reason in ("length", "stop", "cancelled") and len(seq.text) > seq.sent:
            seq.emit({"text": seq.text[seq.sent:]})
            seq.sent = len(seq.text)
        event = {"finish_reason": reason, "completion_tokens": len(seq.tokens), "prompt_tokens": len(seq.prompt)}
        if error:
            event["error"] = error
        seq.emit(event)


def _percentiles(name: str, seconds: list[float], qs: tuple[int, ...] = (50, 99)) -> dict[str, float | None]:
    """``{name}_pQ``: the Q-th percentile of ``seconds`` in milliseconds (None when there are none)."""
    xs = sorted(seconds)
    return {f"{name}_p{q}": round(1e3 * xs[min(len(xs) - 1, len(xs) * q // 100)], 2) if xs else None for q in qs}


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
