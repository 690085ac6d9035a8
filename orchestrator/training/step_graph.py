"""A packed micro-batch's forward and backward captured once as a CUDA graph and replayed (``train.cuda_graph``).

On a GPU the QLoRA step is bound by the host: every layer's forward, recomputation and backward launch
hundreds of small kernels (4-bit dequantize, LoRA matmuls, norms) from Python, and the device waits between
them. Packed rows always have the same shape (``micro_batch_size x max_seq_length`` slots), so the whole
forward and backward of one micro-batch is captured once and each later micro-batch only copies its tokens,
labels, positions and example boundaries into the graph's inputs and replays it: one launch from the host.

What makes the step capturable (the backend supplies the model-specific part, ``graph_forward``):

- example boundaries as fixed-size device tables: the examples' lengths zero-padded to a capacity (a power of
  two); the flash-attention varlen kernel skips empty examples and is told a bound on the longest. Its grid
  and its backward's scratch grow with capacity x bound (at rows of 8,192 slots, one graph sized for 512
  examples of up to 8,192 tokens made the step 1.4x slower than eager), so a few graphs are kept, keyed by
  both rounded up (``GraphKey``), sharing one memory pool, and each micro-batch replays the smallest that fits;
- the loss in fixed-shape chunks (``ChunkedCrossEntropy``): no data-dependent selection of labelled tokens, and
  no full logits tensor;
- gradient checkpointing whose layer inputs wait in fixed pinned host buffers (``ActivationOffload``; Unsloth's
  offloaded checkpointing picks host buffers per call, which a graph cannot replay); LoRA dropout must be 0
  (a replayed recomputation cannot redraw its mask);
- gradients: the parameters and their ``.grad`` are views of flat buffers (``flat.FlatParameters``) that stay
  allocated, so the captured backward accumulates into the same addresses at every replay, scaled by a device
  scalar (``1 / micro-batches`` of the step); the optimizer, clipping and zeroing then see one tensor each;
- no DDP wrapper: the strategy all-reduces the step's gradients once, after the last micro-batch.

Micro-batches of another shape (an epoch's short last one) and evaluation run eagerly as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.training.flat_params import FlatParameters
from orchestrator.training.kernels import cross_entropy_grad_

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    lengths: torch.Tensor  # int32 [capacity], zero-padded
    cu_seqlens: torch.Tensor  # int32 [capacity + 1]
    longest: int  # the bound flash attention is told
    loss: torch.Tensor | None = None


def example_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """Lengths of the examples of a packed (flattened) row, from its restarting position ids (host tensor)."""
    pos = position_ids.reshape(-1)
    starts = torch.cat([torch.nonzero(pos == 0).flatten(), torch.tensor([pos.numel()])])
    return torch.diff(starts)


def bucket(n: int) -> int:
    """Example-count capacity of a graph holding ``n`` examples: a power of two, at least 8."""
    return max(8, 1 << (n - 1).bit_length())


def length_bound(longest: int, max_len: int) -> int:
    """The longest-example bound of a graph: ``longest`` rounded up to an eighth of the row (at least 128)."""
    step = max(128, max_len // 8)
    return min(max_len, -(-longest // step) * step)


GraphKey = tuple[int, int]  # (example capacity, longest-example bound)


@dataclass
class Staged:
    """A host micro-batch made ready for a replay ahead of time (``GraphedStep.prepare``): its examples' lengths
    and pinned copies of its inputs, so that only the copies to the device and the replay are left."""
    batch: dict[str, torch.Tensor]
    lengths: torch.Tensor
    pinned: dict[str, torch.Tensor]


def choose_graph(have: list[GraphKey], need: GraphKey, limit: int) -> tuple[GraphKey, GraphKey | None]:
    """Which graph a micro-batch replays: ``(key, None)`` replays a kept graph, ``(need, evict)`` captures a new
    one (dropping ``evict`` when ``limit`` graphs are kept). The graph made for this shape if there is one; a new
    one while there is room; else the cheapest kept graph that fits (capacity x bound); a new one, in place of
    the least recently used (``have`` is oldest first), only when none fits."""
    if need in have:
        return need, None
    if len(have) < limit:
        return need, None
    fits = [k for k in have if k[0] >= need[0] and k[1] >= need[1]]
    if fits:
        return min(fits, key=lambda k: k[0] * k[1]), None
    return need, have[0]


def _drop_cublas_workspaces() -> None:
    """Release cuBLAS's cached workspaces (32 MB on Hopper per handle and stream; forward and backward run on
    different threads, so different handles). Around a capture, as torch's own CUDA-graph trees do: the
    warm-up's are released before the capture, and the capture's own, allocated in the graph's pool, are
    released back to it after, where only replays use them. Kept, they would add 64 MB per capture to the
    allocated memory on top of the eager path's."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


class GraphedStep:
    """Replays one captured forward + backward per packed micro-batch of ``rows x max_len`` tokens.

    ``forward(module, inputs, lengths, cu_seqlens, longest)`` is the backend's graph-safe forward returning the
    loss: no host syncs, no host-read example lengths; ``inputs`` are the static device tensors of a flattened
    row (input_ids, labels, position_ids, each ``[1, rows * max_len]``). Up to ``max_graphs`` graphs are kept
    (``choose_graph``), in one memory pool: each is replayed only after the previous replay's loss was copied
    out, and nothing else of it outlives its replay. ``flat`` holds the module's trainable parameters: each
    replay adds its gradients, times ``scale``, to their (flat) ``.grad``.
    """

    def __init__(self, module: torch.nn.Module, forward: Callable[..., torch.Tensor], device: torch.device,
                 rows: int, max_len: int, flat: FlatParameters, warmup: int = 2, max_graphs: int = 4):
        self.module, self.forward, self.device, self.flat = module, forward, device, flat
        self.rows, self.max_len, self.warmup, self.max_graphs = rows, max_len, warmup, max_graphs
        self.tokens = rows * max_len
        self.scale = torch.ones((), dtype=torch.float32, device=device)  # a graph input, set when it changes
        self.scale_value = 1.0
        self.inputs = {"input_ids": torch.zeros(1, self.tokens, dtype=torch.long, device=device),
                       "labels": torch.full((1, self.tokens), -100, dtype=torch.long, device=device),
                       "position_ids": torch.zeros(1, self.tokens, dtype=torch.long, device=device)}
        self.graphs: dict[GraphKey, _Graph] = {}  # least recently used first
        self.pool = None
        self.side = torch.cuda.Stream(device)  # warm-ups and captures
        self.captures = 0

    def accepts(self, batch: dict[str, torch.Tensor]) -> bool:
        """A host batch of packed rows this step can replay (the right shape)."""
        return ("position_ids" in batch and "attention_mask" not in batch
                and batch["input_ids"].numel() == self.tokens)

    def prepare(self, batch: dict[str, torch.Tensor]) -> Staged:
        """The host's share of a replay, done early: the loop prepares the next step's first micro-batch while
        the device still runs this step, so the device idles only for a few launches between steps."""
        return Staged(batch, example_lengths(batch["position_ids"]).to(torch.int32),
                      {k: batch[k].reshape(1, -1).pin_memory() for k in self.inputs})

    def _stage(self, staged: Staged, g: _Graph) -> None:
        """Copy a prepared batch and its examples' lengths into the graph's inputs (non-blocking, ordered before
        the replay)."""
        for k, v in self.inputs.items():
            v.copy_(staged.pinned[k], non_blocking=True)
        lengths, size = staged.lengths, len(g.lengths)
        table = torch.zeros(2 * size + 1, dtype=torch.int32)
        table[:len(lengths)] = lengths
        table[size + 1:size + 1 + len(lengths)] = torch.cumsum(lengths, 0)
        table[size + 1 + len(lengths):] = self.tokens
        device_table = table.pin_memory().to(self.device, non_blocking=True)
        g.lengths.copy_(device_table[:size])
        g.cu_seqlens.copy_(device_table[size:])

    def _run(self, g: _Graph) -> torch.Tensor:
        loss = self.forward(self.module, self.inputs, g.lengths, g.cu_seqlens, g.longest)
        (loss * self.scale).backward()
        return loss

    def _capture(self, staged: Staged, key: GraphKey) -> _Graph:
        size, longest = key
        g = _Graph(torch.cuda.CUDAGraph(), torch.zeros(size, dtype=torch.int32, device=self.device),
                   torch.zeros(size + 1, dtype=torch.int32, device=self.device), longest)
        self._stage(staged, g)
        # a step's gradients so far (the warm-up adds to them), kept on the host: a device copy would add their
        # size to the capture's peak memory
        held = [gr.to("cpu") for gr in self.flat.grads]
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        _drop_cublas_workspaces()
        with torch.cuda.stream(self.side):  # kernels compile, cuBLAS and allocator warm up outside the capture
            for _ in range(self.warmup):
                self._run(g)
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        _drop_cublas_workspaces()
        with torch.cuda.graph(g.graph, pool=self.pool, stream=self.side):
            g.loss = self._run(g).detach()
        _drop_cublas_workspaces()
        self.pool = self.pool or g.graph.pool()
        for gr, h in zip(self.flat.grads, held, strict=True):
            gr.copy_(h)
        self.captures += 1
        log.info("captured a training step graph: %d tokens, up to %d examples of up to %d", self.tokens, size,
                 longest)
        return g

    def run(self, batch: dict[str, torch.Tensor] | Staged, scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of ``batch`` (host tensors, or prepared); the gradients, times ``scale``, are added
        to the parameters' ``.grad``. Returns the unscaled loss (a device tensor)."""
        staged = batch if isinstance(batch, Staged) else self.prepare(batch)
        if scale != self.scale_value:
            self.scale.fill_(scale)
            self.scale_value = scale
        need = (bucket(len(staged.lengths)), length_bound(int(staged.lengths.max()), self.max_len))
        key, evict = choose_graph(list(self.graphs), need, self.max_graphs)
        if evict is not None:
            del self.graphs[evict]
        g = self.graphs.pop(key, None)
        if g is None:
            g = self._capture(staged, key)
        else:
            self._stage(staged, g)
        self.graphs[key] = g  # most recently used last
        g.graph.replay()
        return g.loss.clone()


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (-100 ignored), ``chunk`` tokens at a time,
    in fixed shapes (CUDA-graph safe): at most one chunk's fp32 logits are alive. ``hidden`` [T, H], ``weight``
    [V, H] (the LM head), ``labels`` [T]. With a frozen head (LoRA) the gradient for ``hidden`` is computed in
    the forward, from the logits it has anyway (turned into their gradient in place by one Triton kernel on a GPU,
    :mod:`orchestrator.training.kernels`), and kept in place of ``hidden``: the backward only scales it (no second
    pass through the head). A trained head keeps ``hidden`` and recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        keep = labels != -100
        n = keep.sum().clamp_min(1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        early = not weight.requires_grad
        d_hidden = torch.empty_like(hidden) if early else None
        for s in range(0, hidden.shape[0], chunk):
            lab = labels[s:s + chunk]
            logits = hidden[s:s + chunk] @ weight.t()
            if early:  # the logits become d(loss)/d(logits) = (softmax - one-hot) / n on labelled tokens, in place
                total += cross_entropy_grad_(logits, lab, n).sum()
                d_hidden[s:s + chunk] = logits @ weight
                continue
            logits = logits.float()
            lse = torch.logsumexp(logits, -1)
            target = logits.gather(1, lab.clamp_min(0)[:, None])[:, 0]
            total += ((lse - target) * keep[s:s + chunk]).sum()
        if early:
            ctx.save_for_backward(d_hidden)
        else:
            ctx.save_for_backward(hidden, weight, labels, n)
        ctx.chunk, ctx.early = chunk, early
        return total / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.early:
            (d_hidden,) = ctx.saved_tensors
            return d_hidden * grad.to(d_hidden.dtype), None, None, None
        hidden, weight, labels, n = ctx.saved_tensors
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, lab = hidden[s:s + ctx.chunk], labels[s:s + ctx.chunk]
            p = torch.softmax((h @ weight.t()).float(), -1)
            p.scatter_add_(1, lab.clamp_min(0)[:, None], torch.full_like(p[:, :1], -1.0))
            p *= ((lab != -100) * (grad / n))[:, None]
            p = p.to(hidden.dtype)
            d_hidden[s:s + ctx.chunk] = p @ weight
            if d_weight is not None:
                d_weight += (p.t() @ h).float()
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None, None


class Recompute:
    """While a checkpointed layer runs (``offload``: its ``ActivationOffload``; ``active``: run again for its
    backward), an operation may keep a tensor of the first run for the second (``ActivationOffload.attach`` /
    ``take``: flash attention's output, ``backends.stash_attention_in_recompute``) or, when its output feeds only
    the layer's output, skip its work in the second (``backends.skip_mlp_output_in_recompute``)."""

    active = False
    offload: ActivationOffload | None = None


class _Offloaded(torch.autograd.Function):
    """A checkpointed layer whose input waits in pinned host memory until its backward recomputes it."""

    @staticmethod
    def forward(ctx, offload: ActivationOffload, run: Callable, hidden: torch.Tensor) -> torch.Tensor:
        ctx.offload, ctx.run, ctx.index = offload, run, offload.save(hidden)
        Recompute.offload, offload.current = offload, ctx.index
        try:
            with torch.no_grad():
                out = run(hidden)
        finally:
            Recompute.offload = None
        ctx.tuple = isinstance(out, tuple)
        return out[0] if ctx.tuple else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        offload = ctx.offload
        hidden = offload.load(ctx.index).requires_grad_(True)
        Recompute.active, Recompute.offload, offload.current, offload.taken = True, offload, ctx.index, 0
        try:
            with torch.enable_grad():
                out = ctx.run(hidden)
        finally:
            Recompute.active, Recompute.offload = False, None
        torch.autograd.backward(out[0] if ctx.tuple else out, grad)
        return None, None, hidden.grad


Key = tuple[int, int]  # (layer, part): part 0 the layer's input, then what its first run attached


class ActivationOffload:
    """Gradient checkpointing that parks each layer's input in a pinned host buffer, CUDA-graph safe.

    The buffers (one per layer and part) live as long as the model, so a captured step's copies replay to and
    from the same addresses. Forward: each layer's input (and whatever its run ``attach``es) is copied to the
    host on a side stream while the layer runs; the device copies are released once those copies are done.
    Backward: a layer's parts come back just before its recomputation, and the next layer down's are prefetched
    on the side stream meanwhile. Device memory holds two layers' parts at a time instead of one per layer
    (Unsloth's offloaded checkpointing does the same with host buffers it picks per call, which a graph cannot
    replay)."""

    def __init__(self, device: torch.device):
        self.device, self.side = device, torch.cuda.Stream(device)
        self.slots: dict[Key, torch.Tensor] = {}
        self.shapes: dict[Key, torch.Size] = {}
        self.copying: dict[Key, tuple[torch.cuda.Event, torch.Tensor]] = {}
        self.fetched: dict[Key, tuple[torch.cuda.Event, torch.Tensor]] = {}
        self.parts: dict[int, int] = {}
        self.philox: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # flash attention's, per layer
        self.count = 0  # layers saved in this forward pass
        self.current = 0  # the layer running (its first run or its recomputation)
        self.taken = 0  # attached parts handed back in the current recomputation

    def begin(self) -> None:
        """A new forward pass: layers count from 0 again."""
        self.count = 0

    def checkpoint(self, run: Callable, hidden: torch.Tensor, *args: Any) -> Any:
        """``_gradient_checkpointing_func`` of a transformers ``GradientCheckpointingLayer``."""
        if args:
            run = _bind(run, args)
        return (_Offloaded.apply(self, run, hidden),)

    def _slot(self, key: Key, t: torch.Tensor) -> torch.Tensor:
        slot = self.slots.get(key)
        if slot is None or slot.numel() < t.numel() or slot.dtype != t.dtype:
            slot = self.slots[key] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
        return slot[:t.numel()]

    def _put(self, key: Key, t: torch.Tensor) -> None:
        slot = self._slot(key, t)
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            slot.copy_(t.detach().reshape(-1), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.side)
        self.shapes[key] = t.shape
        self.copying[key] = (done, t)

    def _release(self, i: int) -> None:
        """Layer ``i``'s parts are on the host (or will be before anything later runs): their device copies go."""
        for k in range(self.parts.get(i, 0)):
            if (i, k) in self.copying:
                done, _ = self.copying.pop((i, k))
                torch.cuda.current_stream(self.device).wait_event(done)

    def save(self, hidden: torch.Tensor) -> int:
        i, self.count = self.count, self.count + 1
        self._release(i - 1)
        self.parts[i] = 1
        self._put((i, 0), hidden)
        return i

    def attach(self, t: torch.Tensor) -> None:
        """Keep ``t``, made by the running layer's first run, for its recomputation (on the host meanwhile)."""
        i = self.current
        self.parts[i] += 1
        self._put((i, self.parts[i] - 1), t)

    def take(self) -> torch.Tensor:
        """The recomputed layer's next attached tensor, back on the device, in the order they were attached."""
        self.taken += 1
        return self._get((self.current, self.taken))

    def _fetch(self, key: Key) -> None:
        buf = torch.empty(self.shapes[key], dtype=self.slots[key].dtype, device=self.device)
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            buf.view(-1).copy_(self.slots[key][:buf.numel()], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.side)
        self.fetched[key] = (done, buf)

    def _get(self, key: Key) -> torch.Tensor:
        if key in self.copying:  # the last layer's parts are still on the device (backward follows the forward)
            done, buf = self.copying.pop(key)
            buf = buf.detach()  # a leaf: the recomputation's backward stops here
        else:
            if key not in self.fetched:
                self._fetch(key)
            done, buf = self.fetched.pop(key)
        torch.cuda.current_stream(self.device).wait_event(done)
        return buf

    def load(self, i: int) -> torch.Tensor:
        """Layer ``i``'s input for its recomputation; the layer below's parts start coming back meanwhile."""
        buf = self._get((i, 0))
        if i > 0:
            for k in range(self.parts[i - 1]):
                self._fetch((i - 1, k))
        return buf


def _bind(run: Callable, args: tuple) -> Callable:
    return lambda hidden: run(hidden, *args)
