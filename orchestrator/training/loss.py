"""Chunked cross-entropy for causal LMs (``train.loss_chunk_tokens``): the training loss without the
full ``tokens x vocab`` logits tensor.

transformers computes ``logits = lm_head(hidden)`` for every position, upcasts them to fp32 and keeps them
(and their gradient) for backward: for 2,048 tokens and a 32k vocabulary that is ~0.65 GB at the loss. Here
only the positions that carry a label (answer tokens; prompt tokens are -100) go through ``lm_head``, in
chunks, each under activation checkpointing, so at most one chunk of logits exists at a time. The loss is
the same mean over labelled tokens that transformers computes.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from torch.utils.checkpoint import checkpoint

from orchestrator.data.tokenization import IGNORE

log = logging.getLogger(__name__)


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), target, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, ``chunk`` positions through ``head`` at a time."""
    h = hidden[:, :-1].reshape(-1, hidden.size(-1))
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE
    h, y = h[keep], y[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), chunk):
        total = total + checkpoint(_chunk_loss, head, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
    return total / max(1, y.numel())


class ChunkedLossCausalLM(torch.nn.Module):
    """Wraps a (peft) causal LM for training forwards: decoder -> chunked loss. DDP or DeepSpeed wrap this
    module, so gradient sync sees the same parameters; evaluation and saving use the wrapped model."""

    def __init__(self, model: torch.nn.Module, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._parts = (lm.get_decoder(), lm.get_output_embeddings())  # a tuple: not registered a second time

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, **_):
        decoder, head = self._parts
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return SimpleNamespace(loss=chunked_lm_loss(out.last_hidden_state, head, labels, self.chunk))


def supports_chunked_loss(model: torch.nn.Module) -> bool:
    """Models whose logits are exactly ``lm_head(last_hidden_state)`` (no soft-capping or logit scale)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    conf = lm.config
    plain = all(getattr(conf, k, None) in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    return plain and hasattr(lm, "get_decoder") and lm.get_output_embeddings() is not None


def training_module(model: torch.nn.Module, task: str, chunk: int | None) -> torch.nn.Module:
    """The module the training forward goes through: the model itself, or the chunked-loss wrapper."""
    if not chunk or task != "causal_lm":
        return model
    if not supports_chunked_loss(model):
        log.warning("train.loss_chunk_tokens: %s has soft-capped or scaled logits; using its own loss",
                    type(model).__name__)
        return model
    return ChunkedLossCausalLM(model, chunk)
