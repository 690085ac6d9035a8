"""The model's forward over one engine step: a packed batch of tokens from many sequences, some decoding their
next token, some prefilling a chunk of their prompt, each attending only to its own sequence in the paged cache.

With the Triton kernels (a GPU; the tests run them through Triton's interpreter) the step is: embedding, then
per layer fused q/k/v matmul (+ LoRA), ``rope_write`` (q/k norms, rotary, cache write), ``paged_attention``,
output matmul (+ LoRA), ``norm_add``, gate/up matmul (+ LoRA), ``act_mul``, down (+ LoRA), ``norm_add``; the
LM head runs on the rows that sample. Without them (the CPU) the same step runs through the model's own
modules and PyTorch's SDPA. With ``batch_invariant`` every matmul is ``kernels.matmul``, whose result for a
row does not depend on the other rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from serve import kernels
from serve.families import Family, projections, rotary_tables


@dataclass
class Batch:
    """One step's inputs on the device (views of one buffer). Tokens ``[0, T)``: ``ids`` (where ``from_row`` is
    set the token is instead the last one sampled for row ``row``), positions, cache slots and their sequence's
    block-table row; attention tiles; the rows that sample; LoRA segments (``perm``/``seg_start``)."""

    ids: torch.Tensor
    pos: torch.Tensor
    slot: torch.Tensor
    row: torch.Tensor
    from_row: torch.Tensor
    tile_row: torch.Tensor
    tile_start: torch.Tensor
    tile_len: torch.Tensor
    sample_idx: torch.Tensor
    perm: torch.Tensor | None = None
    seg_start: torch.Tensor | None = None
    # the host's view of the same step, for the PyTorch path: (row, first token, count, first position) per
    # sequence, and each row's blocks
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)
    blocks: dict[int, list[int]] = field(default_factory=dict)


class Decoder:
    """The step's forward for one model: fused weights, the paged KV cache, rotary tables, the family's pieces."""

    def __init__(self, model, fam: Family, num_blocks: int, block_size: int, max_len: int, use_kernels: bool,
                 batch_invariant: bool = False, adapters=None):
        self.model, self.fam, self.block_size = model, fam, block_size
        self.inner = model.model
        self.layers = list(self.inner.layers)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.kernels, self.batch_invariant, self.adapters = use_kernels, batch_invariant, adapters
        shape = (num_blocks, fam.kv_heads, block_size, fam.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        # q/k/v and gate/up as one matmul each: the modules' weights become views into the fused tensors
        self.weights = [{g: _fuse(*ms) for g, ms in projections(ly).items()} for ly in self.layers]
        self.rot = rotary_tables(model, max_len, self.device, self.dtype)
        self._block_table = torch.zeros(1, 1, dtype=torch.int32, device=self.device)
        self.tile = kernels.tile_tokens(fam.heads // fam.kv_heads, fam.head_dim)

    def lora_shapes(self) -> list[dict[str, tuple[int, list[int]]]]:
        """Per layer and group: (in features, out features of each part), what the adapter pool allocates."""
        return [{g: (ms[0].in_features, [m.out_features for m in ms]) for g, ms in projections(ly).items()}
                for ly in self.layers]

    def kv_bytes_per_block(self) -> int:
        f = self.fam
        return 2 * len(self.layers) * f.kv_heads * self.block_size * f.head_dim * self.dtype.itemsize

    # ---------------------------------------------------------------- pieces

    def _linear(self, x: torch.Tensor, i: int, group: str, b: Batch) -> torch.Tensor:
        w, bias = self.weights[i][group]
        y = kernels.matmul(x, w, bias) if self.batch_invariant else F.linear(x, w, bias)
        if b.perm is not None:
            a_pool, b_pool = self.adapters.pools[i][group]
            if self.kernels:
                kernels.lora_expand(kernels.lora_shrink(x, a_pool), b_pool, b.perm, b.seg_start, y)
            else:
                _lora_torch(x, y, a_pool, b_pool, b)
        return y

    def _norm(self, module, h: torch.Tensor, delta: torch.Tensor | None = None, post=None) -> torch.Tensor:
        """``h += delta`` (normed by ``post`` first) in place, then ``module``'s RMSNorm of ``h``."""
        if self.kernels:
            weight = module.weight
            return kernels.norm_add(h, delta, weight, self.fam.eps, self.fam.gemma_norms,
                                    post.weight if post is not None else None)
        if delta is not None:
            h += post(delta) if post is not None else delta
        return module(h)

    def _attention(self, i: int, qkv: torch.Tensor, b: Batch) -> torch.Tensor:
        """q/k norms, rotary, the cache write and attention: [T, H * D]."""
        f, attn = self.fam, self.layers[i].self_attn
        cos, sin = self.rot[f.layer_types[i]]
        if self.kernels:
            q = kernels.rope_write(qkv, cos, sin, b.pos, b.slot, self.k[i], self.v[i], f.heads, f.kv_heads,
                                   getattr(attn, "q_norm", None).weight if f.qk_norm else None,
                                   getattr(attn, "k_norm", None).weight if f.qk_norm else None, f.eps, f.gemma_norms)
            o = kernels.paged_attention(q, self.k[i], self.v[i], self.block_table, b.tile_row, b.tile_start,
                                        b.tile_len, b.pos, f.scale, f.windows[i], self.tile)
            return o.view(o.shape[0], -1)
        t = qkv.shape[0]
        qkv = qkv.view(t, f.heads + 2 * f.kv_heads, f.head_dim)
        q, k, v = qkv[:, :f.heads], qkv[:, f.heads:f.heads + f.kv_heads], qkv[:, f.heads + f.kv_heads:]
        if f.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        c, s = cos[b.pos][:, None], sin[b.pos][:, None]
        q, k = _rope(q, c, s), _rope(k, c, s)
        blk, off = b.slot // self.block_size, b.slot % self.block_size
        self.k[i][blk, :, off] = k
        self.v[i][blk, :, off] = v
        return _attention_torch(q, self.k[i], self.v[i], b, f.scale, f.windows[i]).reshape(t, -1)

    def _mlp(self, i: int, x: torch.Tensor, b: Batch) -> torch.Tensor:
        gate_up = self._linear(x, i, "gate_up", b)
        if self.kernels:
            up = kernels.act_mul(gate_up, self.fam.activation)
        else:
            gate, u = gate_up.chunk(2, dim=-1)
            up = self.layers[i].mlp.act_fn(gate) * u
        return self._linear(up, i, "down", b)

    # ---------------------------------------------------------------- the step

    def forward(self, b: Batch, last_tokens: torch.Tensor) -> torch.Tensor:
        """Logits [len(sample_idx), vocab] (float32) of the step's sampling rows; k/v of every token cached."""
        ids = torch.where(b.from_row != 0, last_tokens[b.row], b.ids)
        h = self.inner.embed_tokens(ids)  # Gemma's embedding scales itself
        gemma = self.fam.gemma_norms
        x = self._norm(self.layers[0].input_layernorm, h)
        for i, layer in enumerate(self.layers):
            a = self._linear(self._attention(i, self._linear(x, i, "qkv", b), b), i, "o", b)
            if gemma:
                x = self._norm(layer.pre_feedforward_layernorm, h, a, layer.post_attention_layernorm)
            else:
                x = self._norm(layer.post_attention_layernorm, h, a)
            d = self._mlp(i, x, b)
            following = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.inner.norm
            x = self._norm(following, h, d, layer.post_feedforward_layernorm if gemma else None)
        x = x[b.sample_idx]
        head = self.model.lm_head
        logits = (kernels.matmul(x, head.weight, head.bias) if self.batch_invariant else head(x)).float()
        if self.fam.final_softcap:
            logits = torch.tanh(logits / self.fam.final_softcap) * self.fam.final_softcap
        return logits

    @property
    def block_table(self) -> torch.Tensor:
        return self._block_table

    def set_block_table(self, table: torch.Tensor) -> None:
        self._block_table = table


def _fuse(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linear layers on the same input; each layer keeps a view of it."""
    weight = torch.cat([m.weight.data for m in linears]) if len(linears) > 1 else linears[0].weight.data
    biases = [m.bias for m in linears]
    bias = None
    if any(x is not None for x in biases):
        bias = torch.cat([m.bias.data if m.bias is not None else torch.zeros_like(m.weight.data[:, 0])
                          for m in linears])
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start:start + rows]
        if bias is not None and m.bias is not None:
            m.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, b: Batch, scale: float,
                     window: int) -> torch.Tensor:
    """Each sequence's tokens over its own cached positions with SDPA (the CPU path): [T, H, D]. Where every
    sequence has one block (the CPU's layout) the decoding tokens share one SDPA over the cache's first rows."""
    out = torch.zeros_like(q)
    size = k_cache.shape[2]
    single = [s for s in b.segments if s[2] == 1 and s[3] < size]
    if len(single) > 1:
        _decode_rows_torch(q, k_cache, v_cache, out, [(b.blocks[r][0], t, p) for r, t, _, p in single], scale, window)
    done = {id(s) for s in single} if len(single) > 1 else set()
    for seg in b.segments:
        if id(seg) in done:
            continue
        row, start, n, first = seg
        blocks, end = b.blocks[row], first + n  # positions [0, end) are in the cache now
        used = blocks[: -(-end // size)]
        if len(used) == 1:
            k, v = k_cache[used[0], :, :end], v_cache[used[0], :, :end]
        else:
            k = torch.cat([k_cache[x] for x in used], dim=1)[:, :end]
            v = torch.cat([v_cache[x] for x in used], dim=1)[:, :end]
        qpos = torch.arange(first, end, device=q.device)[:, None]
        kpos = torch.arange(end, device=q.device)[None, :]
        mask = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
        o = F.scaled_dot_product_attention(q[start:start + n].transpose(0, 1)[None], k[None], v[None],
                                           attn_mask=mask[None, None], scale=scale, enable_gqa=True)
        out[start:start + n] = o[0].transpose(0, 1)
    return out


def _decode_rows_torch(q, k_cache, v_cache, out, rows: list[tuple[int, int, int]], scale: float, window: int) -> None:
    """One token each of sequences whose positions all sit in their first block ``(block, token, position)``: q
    placed at its block's row, one SDPA over the cache's first rows (views, no copy), the rows read back."""
    blk = torch.tensor([r[0] for r in rows], device=q.device)
    tok = torch.tensor([r[1] for r in rows], device=q.device)
    pos = torch.tensor([r[2] for r in rows], device=q.device)
    nrows, span = int(blk.max()) + 1, int(pos.max()) + 1
    qs = q.new_zeros(nrows, q.shape[1], 1, q.shape[2])
    qs[blk] = q[tok][:, :, None]
    at = torch.full((nrows,), -1, device=q.device, dtype=torch.long)
    at[blk] = pos
    kpos = torch.arange(span, device=q.device)[None, :]
    mask = (kpos <= at[:, None]) & ((kpos > at[:, None] - window) if window else True)
    mask[:, 0] |= at < 0  # rows nobody decodes attend somewhere (their output is dropped)
    o = F.scaled_dot_product_attention(qs, k_cache[:nrows, :, :span], v_cache[:nrows, :, :span],
                                       attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    out[tok] = o[blk, :, 0]


def _lora_torch(x: torch.Tensor, y: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor, b: Batch) -> None:
    """``y += LoRA delta`` per adapter segment (the CPU path of ``kernels.lora_shrink``/``lora_expand``)."""
    bounds = b.seg_start.tolist()
    for slot in range(len(bounds) - 1):
        if bounds[slot] == bounds[slot + 1]:
            continue
        idx = b.perm[bounds[slot]:bounds[slot + 1]]
        y[idx] += (x[idx] @ a_pool[slot].T) @ b_pool[slot].T
