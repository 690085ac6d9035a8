"""Triton kernels of the engine's step on a GPU (``TRITON_INTERPRET=1`` runs them on the CPU, as the tests do).

The step runs over a packed batch of tokens: each running sequence's next token and chunks of prompts being
prefilled, side by side. Per layer:

* ``rope_write``: optional per-head q/k RMSNorm, rotary on q and k, and k/v written into the paged cache.
* ``paged_attention``: every token attends to its own sequence's cached positions up to its own (optionally
  within a sliding window), reading the cache through the sequence's block table. The work is cut into tiles
  of consecutive tokens of one sequence (a running sequence's token is a tile of one) times a kv head; the
  query heads sharing that kv head ride in the same tile, so each cache block is read once per tile.
* ``norm_add``: residual add (optionally of a normed delta, Gemma's post norms) and the next RMSNorm.
* ``act_mul``: SiLU or GELU-tanh of the gate times up.
* ``lora_shrink`` / ``lora_expand``: the LoRA delta of every token's adapter: one dense matmul through every
  resident adapter's (small) A, then one launch adding each token's own adapter's B (tokens sorted by adapter,
  segments of one adapter as tiles: the Punica/S-LoRA approach).
* ``matmul``: a matrix product whose tiling does not depend on the number of rows (batch-invariant results).
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


def tile_tokens(group: int, head_dim: int) -> int:
    """Prompt tokens per attention tile: the tile's rows (tokens x query heads per kv head) stay within 64 (32 for
    256-wide heads) and at least 16."""
    rows = 32 if head_dim >= 256 else 64
    return max(1, rows // group)


def _rows(tile: int, group: int) -> int:
    return max(16, triton.next_power_of_2(tile * group))


if triton is not None:

    @triton.jit
    def _rope_write_kernel(qkv, cos, sin, pos, slot, q_out, k_cache, v_cache, qn_w, kn_w, eps,
                           s_cb, s_ch, s_ct,
                           H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                           QK_NORM: tl.constexpr, GEMMA: tl.constexpr):
        t = tl.program_id(0)
        j = tl.program_id(1)  # 0..H-1: a query head; H..H+KVH-1: a key/value head
        half = tl.arange(0, D // 2)
        p = tl.load(pos + t)
        row = qkv + (t * (H + 2 * KVH) + j) * D
        raw1 = tl.load(row + half)
        raw2 = tl.load(row + D // 2 + half)
        x1 = raw1.to(tl.float32)
        x2 = raw2.to(tl.float32)
        if QK_NORM:
            w = qn_w if j < H else kn_w
            w1 = tl.load(w + half).to(tl.float32)
            w2 = tl.load(w + D // 2 + half).to(tl.float32)
            r = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
            if GEMMA:
                x1 = (x1 * r * (1.0 + w1)).to(raw1.dtype).to(tl.float32)
                x2 = (x2 * r * (1.0 + w2)).to(raw1.dtype).to(tl.float32)
            else:
                x1 = ((x1 * r).to(raw1.dtype).to(tl.float32) * w1).to(raw1.dtype).to(tl.float32)
                x2 = ((x2 * r).to(raw1.dtype).to(tl.float32) * w2).to(raw1.dtype).to(tl.float32)
        c1 = tl.load(cos + p * D + half).to(tl.float32)
        c2 = tl.load(cos + p * D + D // 2 + half).to(tl.float32)
        s1 = tl.load(sin + p * D + half).to(tl.float32)
        s2 = tl.load(sin + p * D + D // 2 + half).to(tl.float32)
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
        if j < H:
            dst = q_out + (t * H + j) * D
            tl.store(dst + half, o1.to(q_out.dtype.element_ty))
            tl.store(dst + D // 2 + half, o2.to(q_out.dtype.element_ty))
        else:
            kh = j - H
            sl = tl.load(slot + t)
            base = (sl // BS) * s_cb + kh * s_ch + (sl % BS) * s_ct
            tl.store(k_cache + base + half, o1.to(k_cache.dtype.element_ty))
            tl.store(k_cache + base + D // 2 + half, o2.to(k_cache.dtype.element_ty))
            vrow = qkv + (t * (H + 2 * KVH) + H + KVH + kh) * D
            tl.store(v_cache + base + half, tl.load(vrow + half))
            tl.store(v_cache + base + D // 2 + half, tl.load(vrow + D // 2 + half))

    @triton.jit
    def _paged_attention_kernel(q, k_cache, v_cache, out, block_table, bt_stride, tile_row, tile_start, tile_len,
                                pos, scale, window, s_cb, s_ch, s_ct,
                                H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                                BLOCK_M: tl.constexpr, SINGLE: tl.constexpr, KB: tl.constexpr):
        t = tl.program_id(0)
        kh = tl.program_id(1)
        n = tl.load(tile_len + t)
        if (n == 1) if SINGLE else (n > 1):
            row = tl.load(tile_row + t)
            start = tl.load(tile_start + t)
            m = tl.arange(0, BLOCK_M)
            j = m // GROUP
            valid = j < n
            tok = start + tl.where(valid, j, 0)
            qpos = tl.load(pos + tok)
            d = tl.arange(0, D)
            head = kh * GROUP + m % GROUP
            qv = tl.load(q + (tok[:, None] * H + head[:, None]) * D + d[None, :], mask=valid[:, None], other=0.0)
            first = tl.load(pos + start)
            last = tl.load(pos + start + n - 1)
            lo = tl.where(window > 0, tl.maximum(first - window + 1, 0), 0)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D], tl.float32)
            kt = tl.arange(0, KB * BS)  # KB cache blocks per iteration: more of the cache in flight at once
            nb = last // BS + 1
            for b in range(lo // BS, nb, KB):
                jb = b + kt // BS
                blk = tl.load(block_table + row * bt_stride + jb, mask=jb < nb, other=0)  # past the end: block 0
                offs = blk[:, None] * s_cb + kh * s_ch + (kt % BS)[:, None] * s_ct + d[None, :]
                k = tl.load(k_cache + offs)
                s = tl.dot(qv, tl.trans(k)) * scale
                kp = b * BS + kt
                ok = (kp[None, :] <= qpos[:, None]) & ((kp[None, :] > qpos[:, None] - window) | (window <= 0))
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(v_cache + offs)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out + (tok[:, None] * H + head[:, None]) * D + d[None, :], o.to(out.dtype.element_ty),
                     mask=valid[:, None])

    @triton.jit
    def _rms(x, w, eps, N: tl.constexpr, GEMMA: tl.constexpr):
        """RMSNorm of a row ``x`` (any float dtype) by weight ``w``, rounded as the model's own norm rounds."""
        xf = x.to(tl.float32)
        r = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
        if GEMMA:
            return (xf * r * (1.0 + w.to(tl.float32))).to(x.dtype)
        return (w.to(tl.float32) * (xf * r).to(x.dtype).to(tl.float32)).to(x.dtype)

    @triton.jit
    def _norm_add_kernel(h, delta, w_post, w_next, out, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                         ADD: tl.constexpr, POST: tl.constexpr, GEMMA: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        m = c < N
        x = tl.load(h + row * N + c, mask=m, other=0.0)
        if ADD:
            dl = tl.load(delta + row * N + c, mask=m, other=0.0)
            if POST:
                dl = _rms(dl, tl.load(w_post + c, mask=m, other=0.0), eps, N, GEMMA)
            x = (x.to(tl.float32) + dl.to(tl.float32)).to(dl.dtype)
            tl.store(h + row * N + c, x, mask=m)
        tl.store(out + row * N + c, _rms(x, tl.load(w_next + c, mask=m, other=0.0), eps, N, GEMMA), mask=m)

    @triton.jit
    def _act_mul_kernel(gate_up, out, N: tl.constexpr, BLOCK: tl.constexpr, GELU: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < N
        g = tl.load(gate_up + row * 2 * N + c, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gate_up + row * 2 * N + N + c, mask=m, other=0.0)
        if GELU:  # gelu, tanh approximation: 0.5 g (1 + tanh(z)) = g * sigmoid(2z)
            act = g * tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g))
        else:
            act = g * tl.sigmoid(g)
        tl.store(out + row * N + c, (act.to(u.dtype).to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=m)

    @triton.jit
    def _lora_expand_kernel(s_in, b_pool, y, perm, seg_start, N: tl.constexpr, R: tl.constexpr, SR: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        ad = tl.program_id(0)
        lo = tl.load(seg_start + ad)
        hi = tl.load(seg_start + ad + 1)
        i0 = lo + tl.program_id(1) * BLOCK_T
        if i0 < hi:
            i = i0 + tl.arange(0, BLOCK_T)
            valid = i < hi
            tok = tl.load(perm + i, mask=valid, other=0)
            r = tl.arange(0, R)
            n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
            sv = tl.load(s_in + tok[:, None] * SR + ad * R + r[None, :], mask=valid[:, None], other=0.0)
            bv = tl.load(b_pool + ad * N * R + n[:, None] * R + r[None, :], mask=n[:, None] < N, other=0.0)
            delta = tl.dot(sv.to(bv.dtype), tl.trans(bv))
            ok = valid[:, None] & (n[None, :] < N)
            dst = y + tok[:, None] * N + n[None, :]
            yv = tl.load(dst, mask=ok, other=0.0)
            tl.store(dst, (yv.to(tl.float32) + delta).to(yv.dtype), mask=ok)

    @triton.jit
    def _matmul_kernel(a, b, c, bias, M, N: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, K, BK):  # the same order and tiles whatever M is: a row's result never depends on M
            rk = k0 + tl.arange(0, BK)
            av = tl.load(a + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            bv = tl.load(b + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            acc += tl.dot(av, tl.trans(bv))
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c + rm[:, None] * N + rn[None, :], acc.to(c.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
               q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
               gemma: bool = False) -> torch.Tensor:
    """Rotate q and k of ``qkv`` [T, (H + 2 KVH) * D] at ``pos`` [T] (RMSNorm of each head first when
    ``q_norm``/``k_norm`` are given); write k and v into the caches [blocks, KVH, BS, D] at ``slot`` [T];
    return the rotated q [T, H, D]."""
    t, d = qkv.shape[0], k_cache.shape[-1]
    q = torch.empty(t, heads, d, device=qkv.device, dtype=qkv.dtype)
    norm = q_norm is not None
    _rope_write_kernel[(t, heads + kv_heads)](
        qkv, cos, sin, pos, slot, q, k_cache, v_cache, q_norm if norm else cos, k_norm if norm else cos, eps,
        *k_cache.stride()[:3], H=heads, KVH=kv_heads, D=d, BS=k_cache.shape[2], QK_NORM=norm, GEMMA=gemma)
    return q


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    tile_row: torch.Tensor, tile_start: torch.Tensor, tile_len: torch.Tensor, pos: torch.Tensor,
                    scale: float, window: int = 0, tile: int = 16, launch: dict | None = None) -> torch.Tensor:
    """Attention of ``q`` [T, H, D] over each token's own sequence: tile i is ``tile_len[i]`` consecutive tokens
    from ``tile_start[i]`` of the sequence whose blocks are ``block_table[tile_row[i]]`` (``tile_len`` 0: unused).
    Token t sees positions up to ``pos[t]`` (and above ``pos[t] - window`` when ``window``)."""
    t, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    grid = (tile_len.shape[0], kv_heads)
    # one launch for the one-token tiles (decoding sequences: few rows), one for the prompt tiles (many rows)
    for single, rows in ((True, _rows(1, group)), (False, _rows(tile, group))):
        # decoding tokens: two cache blocks per iteration on two warps (bench/attention_check.py: 6-12% less time
        # than one block on four, Llama-2 and GQA shapes, 250 and 1,000 positions, H200)
        opts = ({"KB": 2, "num_warps": 2 if d <= 128 else 4, "num_stages": 3} if single
                else {"KB": 1, "num_warps": 8 if d >= 256 else 4})
        opts.update((launch or {}).get("single" if single else "tile", {}))
        _paged_attention_kernel[grid](q, k_cache, v_cache, out, block_table, block_table.stride(0), tile_row,
                                      tile_start, tile_len, pos, scale, window, *k_cache.stride()[:3], H=heads,
                                      GROUP=group, D=d, BS=k_cache.shape[2], BLOCK_M=rows, SINGLE=single, **opts)
    return out


def norm_add(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, gemma: bool = False,
             post: torch.Tensor | None = None) -> torch.Tensor:
    """``h += delta`` in place (``delta`` normed by ``post`` first when given) and return the RMSNorm of ``h`` by
    ``weight``; with ``delta`` None only the norm. Rounded as the model's own ops round."""
    n = h.shape[-1]
    out = torch.empty_like(h)
    _norm_add_kernel[(h.shape[0],)](h, delta if delta is not None else h, post if post is not None else weight,
                                    weight, out, eps, N=n, BLOCK=triton.next_power_of_2(n), ADD=delta is not None,
                                    POST=post is not None, GEMMA=gemma)
    return out


def act_mul(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up for ``gate_up`` [T, 2I] holding gate then up in each row (SiLU or GELU-tanh)."""
    t, n = gate_up.shape[0], gate_up.shape[-1] // 2
    out = torch.empty(t, n, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _act_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, N=n, BLOCK=block, GELU=activation == "gelu_tanh")
    return out


def lora_shrink(x: torch.Tensor, a_pool: torch.Tensor) -> torch.Tensor:
    """Every token's input through every resident adapter's A at once: ``x`` [T, K] @ ``a_pool`` [slots, R, K]
    -> [T, slots * R], one dense matmul (the A matrices are small: slots * R rows), whose column block of the
    token's own adapter ``lora_expand`` reads."""
    return x @ a_pool.view(-1, a_pool.shape[-1]).T


def lora_expand(s: torch.Tensor, b_pool: torch.Tensor, perm: torch.Tensor, seg_start: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
    """``y[t] += s[t, own adapter's R columns] @ b_pool[adapter of t].T`` in place, adapter by adapter: slot a's
    tokens are ``perm[seg_start[a]:seg_start[a + 1]]``, tiles of them one program each (the Punica/S-LoRA segment
    approach); ``b_pool`` [slots, N, R], ``s`` from ``lora_shrink``. Tokens without an adapter are not listed."""
    t, n = y.shape
    slots, r = b_pool.shape[0], b_pool.shape[2]
    block_t, block_n = 16, 64
    _lora_expand_kernel[(slots, triton.cdiv(t, block_t), triton.cdiv(n, block_n))](
        s, b_pool, y, perm, seg_start, N=n, R=r, SR=slots * r, BLOCK_T=block_t, BLOCK_N=block_n)
    return y


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` with tiles that do not depend on the number of rows of ``x``, so a row's result is
    the same whatever else is in the batch (``serve.batch_invariant``)."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bm, bn, bk = 64, 64, 64
    _matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](x, weight, out, bias if bias is not None else weight, m,
                                                             N=n, K=k, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk)
    return out
