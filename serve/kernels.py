"""Triton kernels for the decode step on a GPU: rotary + KV-cache write, and attention over each row's own length.

Both run inside the engine's CUDA graphs. ``decode_attention`` reads only the first ``pos[b] + 1`` cache
positions of each row, so the step's KV traffic follows the real lengths instead of a padded span; that is
why the engine needs one graph per batch size on this path. Without Triton (the CPU), ``available()`` is
False and the engine uses PyTorch's SDPA over span buckets instead. ``TRITON_INTERPRET=1`` runs these
kernels on the CPU (the tests do, against the SDPA path).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no Triton
    triton = None


def available(device: torch.device) -> bool:
    """Whether the kernels can run for tensors on ``device``."""
    import os

    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _rope_cache_kernel(qkv, cos, sin, pos, q_out, k_cache, v_cache,
                           s_cb, s_ch, s_ct,
                           H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        j = tl.program_id(1)  # 0..H-1: a query head; H..H+KVH-1: a key/value head
        half = tl.arange(0, D // 2)
        p = tl.load(pos + b)
        row = qkv + (b * (H + 2 * KVH) + j) * D
        x1 = tl.load(row + half).to(tl.float32)
        x2 = tl.load(row + D // 2 + half).to(tl.float32)
        c1 = tl.load(cos + p * D + half).to(tl.float32)
        c2 = tl.load(cos + p * D + D // 2 + half).to(tl.float32)
        s1 = tl.load(sin + p * D + half).to(tl.float32)
        s2 = tl.load(sin + p * D + D // 2 + half).to(tl.float32)
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
        if j < H:
            dst = q_out + (b * H + j) * D
            tl.store(dst + half, o1.to(q_out.dtype.element_ty))
            tl.store(dst + D // 2 + half, o2.to(q_out.dtype.element_ty))
        else:
            kh = j - H
            dst = k_cache + b * s_cb + kh * s_ch + p * s_ct
            tl.store(dst + half, o1.to(k_cache.dtype.element_ty))
            tl.store(dst + D // 2 + half, o2.to(k_cache.dtype.element_ty))
            vrow = qkv + (b * (H + 2 * KVH) + H + KVH + kh) * D
            vdst = v_cache + b * s_cb + kh * s_ch + p * s_ct
            tl.store(vdst + half, tl.load(vrow + half))
            tl.store(vdst + D // 2 + half, tl.load(vrow + D // 2 + half))

    @triton.jit
    def _attend(q, k_cache, v_cache, b, h, first, end, n, scale, s_cb, s_ch, s_ct,
                H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        """Online softmax of row b, head h over cache positions [first, end) (< n valid): (acc, max, sum)."""
        d = tl.arange(0, D)
        qv = tl.load(q + (b * H + h) * D + d).to(tl.float32) * scale
        base = b * s_cb + (h // GROUP) * s_ch
        m = tl.full([], float("-inf"), tl.float32)
        total = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([D], dtype=tl.float32)
        for start in range(first, end, BLOCK):
            t = start + tl.arange(0, BLOCK)
            valid = t < n
            offs = base + t[:, None] * s_ct + d[None, :]
            k = tl.load(k_cache + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.where(valid, tl.sum(k * qv[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m - m_new)
            v = tl.load(v_cache + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            total = total * alpha + tl.sum(p, axis=0)
            m = m_new
        return acc, m, total

    @triton.jit
    def _decode_attention_kernel(q, k_cache, v_cache, pos, out, scale,
                                 s_cb, s_ch, s_ct,
                                 H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        n = tl.load(pos + b) + 1  # positions 0..pos attend
        acc, m, total = _attend(q, k_cache, v_cache, b, h, 0, n, n, scale, s_cb, s_ch, s_ct, H, GROUP, D, BLOCK)
        tl.store(out + (b * H + h) * D + tl.arange(0, D), (acc / total).to(out.dtype.element_ty))

    @triton.jit
    def _attention_part_kernel(q, k_cache, v_cache, pos, part, stats, scale,
                               s_cb, s_ch, s_ct,
                               H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                               CHUNK: tl.constexpr, SPLITS: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        n = tl.load(pos + b) + 1
        first = sp * CHUNK
        if first < n:
            acc, m, total = _attend(q, k_cache, v_cache, b, h, first, tl.minimum(first + CHUNK, n), n, scale,
                                    s_cb, s_ch, s_ct, H, GROUP, D, BLOCK)
            row = (b * H + h) * SPLITS + sp
            tl.store(part + row * D + tl.arange(0, D), acc)
            tl.store(stats + row * 2, m)
            tl.store(stats + row * 2 + 1, total)

    @triton.jit
    def _attention_merge_kernel(part, stats, pos, out, H: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                                SPLITS: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        used = tl.cdiv(tl.load(pos + b) + 1, CHUNK)
        sp = tl.arange(0, SPLITS)
        ok = sp < used
        row = (b * H + h) * SPLITS + sp
        m = tl.load(stats + row * 2, mask=ok, other=float("-inf"))
        total = tl.load(stats + row * 2 + 1, mask=ok, other=0.0)
        w = tl.where(ok, tl.exp(m - tl.max(m, axis=0)), 0.0)
        d = tl.arange(0, D)
        acc = tl.load(part + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(total * w, axis=0)
        tl.store(out + (b * H + h) * D + d, o.to(out.dtype.element_ty))


def rope_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Rotate q and k of ``qkv`` [B, (H + 2 KVH) * D] at positions ``pos`` [B]; write k and v into row b of the
    caches [slots, KVH, max_len, D] at ``pos[b]``; return the rotated q [B, H, D]."""
    b, d = qkv.shape[0], k_cache.shape[-1]
    q = torch.empty(b, heads, d, device=qkv.device, dtype=qkv.dtype)
    _rope_cache_kernel[(b, heads + kv_heads)](qkv, cos, sin, pos, q, k_cache, v_cache,
                                             *k_cache.stride()[:3], H=heads, KVH=kv_heads, D=d)
    return q


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     block: int = 128, chunk: int | None = None, warps: int = 4) -> torch.Tensor:
    """Softmax attention of ``q`` [B, H, D] (one token per row) over cache positions 0..pos[b] of row b.

    ``chunk``: split each row's positions into chunks of this many, one program each, merged by a second
    kernel (flash-decoding: more programs in flight when B * H is small or rows are long); None: one program
    per (row, head) walks the whole length. The defaults were the fastest on an H100 at 1-64 rows of 200-328
    positions (bench/results/engine_check_h100.json: 66.7 us per layer at 32 rows, 75.4 with 64-position
    blocks, 72.0 for the best split)."""
    b, heads, d = q.shape
    out = torch.empty_like(q)
    group, strides = heads // k_cache.shape[1], k_cache.stride()[:3]
    if chunk is None:
        _decode_attention_kernel[(b, heads)](q, k_cache, v_cache, pos, out, d ** -0.5, *strides,
                                             H=heads, GROUP=group, D=d, BLOCK=block, num_warps=warps)
        return out
    splits = triton.next_power_of_2(triton.cdiv(k_cache.shape[2], chunk))
    part = torch.empty(b * heads * splits, d, device=q.device, dtype=torch.float32)
    stats = torch.empty(b * heads * splits, 2, device=q.device, dtype=torch.float32)
    _attention_part_kernel[(b, heads, splits)](q, k_cache, v_cache, pos, part, stats, d ** -0.5, *strides,
                                               H=heads, GROUP=group, D=d, BLOCK=block, CHUNK=chunk,
                                               SPLITS=splits, num_warps=warps)
    _attention_merge_kernel[(b, heads)](part, stats, pos, out, H=heads, D=d, CHUNK=chunk, SPLITS=splits)
    return out


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(h, delta, w, out, eps, N: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        m = c < N
        x = tl.load(h + row * N + c, mask=m, other=0.0) + tl.load(delta + row * N + c, mask=m, other=0.0)
        tl.store(h + row * N + c, x, mask=m)
        xf = x.to(tl.float32)
        y = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)).to(x.dtype)
        wv = tl.load(w + c, mask=m, other=0.0)
        tl.store(out + row * N + c, (wv.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask=m)

    @triton.jit
    def _silu_mul_kernel(gate_up, out, N: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < N
        g = tl.load(gate_up + row * 2 * N + c, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gate_up + row * 2 * N + N + c, mask=m, other=0.0)
        act = (g * tl.sigmoid(g)).to(u.dtype)
        tl.store(out + row * N + c, (act.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=m)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``h += delta`` in place (rows of [B, N]) and return RMSNorm(h) * weight, rounded as the eager ops round."""
    n = h.shape[-1]
    out = torch.empty_like(h)
    _add_rms_norm_kernel[(h.shape[0],)](h, delta, weight, out, eps, N=n, BLOCK=triton.next_power_of_2(n))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for ``gate_up`` [B, 2I] holding gate then up in each row."""
    b, n = gate_up.shape[0], gate_up.shape[-1] // 2
    out = torch.empty(b, n, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(b, triton.cdiv(n, block))](gate_up, out, N=n, BLOCK=block)
    return out
