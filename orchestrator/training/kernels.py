"""Triton kernel of the CUDA-graphed step's loss (``TRITON_INTERPRET=1`` runs it on the CPU, as the tests do).

``cross_entropy_grad_``: a chunk of LM-head logits, as the matmul wrote them (bf16), to each row's cross-entropy
and, in place, its gradient ``(softmax - one-hot) / n`` on labelled rows (0 elsewhere). One program per row reads
the row twice (an online max and sum of exponentials, then the gradient) and writes it once, all arithmetic in
fp32: no fp32 copy of the chunk and no temporaries of its size. For 512 tokens of a 128,256-token vocabulary
PyTorch's version keeps ~526 MB alive at its peak (the fp32 logits, ``logsumexp``'s temporary of the same size)
and passes over the chunk about ten times; this keeps only the 131 MB bf16 chunk.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no Triton
    triton = None

IGNORE = -100


def available(device: torch.device) -> bool:
    """Whether the kernel can run for tensors on ``device``."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _cross_entropy_grad_kernel(logits, stride, labels, count, loss, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * stride
        label = tl.load(labels + row).to(tl.int64)
        keep = label != -100
        target = tl.where(keep, label, 0)
        m = float("-inf")
        total = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(total)
        picked = tl.load(base + target).to(tl.float32)  # read before the row is overwritten
        tl.store(loss + row, tl.where(keep, lse - picked, 0.0))
        scale = tl.where(keep, 1.0 / tl.load(count).to(tl.float32), 0.0)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(base + cols, (g * scale).to(logits.dtype.element_ty), mask=cols < V)


def _torch_cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    x = logits.float()
    keep = labels != IGNORE
    target = labels.clamp_min(0)[:, None]
    lse = torch.logsumexp(x, -1)
    loss = (lse - x.gather(1, target)[:, 0]) * keep
    p = x.sub_(lse[:, None]).exp_()
    p.scatter_add_(1, target, torch.full_like(p[:, :1], -1.0))
    p *= (keep / count)[:, None]
    logits.copy_(p)
    return loss


def cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor,
                        block: int | None = None) -> torch.Tensor:
    """Each row's cross-entropy (fp32, 0 where the label is -100), and ``logits`` [rows, V] overwritten with the
    gradient of ``sum(loss) / count`` (``count`` a device scalar: no host sync, CUDA-graph safe). Triton where
    :func:`available`, else PyTorch (with an fp32 copy of the chunk)."""
    if not available(logits.device) or logits.stride(-1) != 1:
        return _torch_cross_entropy_grad_(logits, labels, count)
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block = block or min(32768, triton.next_power_of_2(vocab))
    _cross_entropy_grad_kernel[(rows,)](logits, logits.stride(0), labels, count, loss, vocab, BLOCK=block,
                                        num_warps=32 if block >= 32768 else 8)
    return loss
