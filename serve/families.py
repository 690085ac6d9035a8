"""What the decode engine needs to know of a model family, read off a transformers causal LM: where its weights
are, how its norms and activation compute, which layers attend through a sliding window, and the rotary tables.

Families: Llama (2, 3.x with its rope scaling), Mistral (sliding window), Qwen 2/2.5 (q/k/v biases, optional
sliding layers), Qwen 3 (q/k RMSNorm per head), Gemma 3 (``(1 + w)`` norms computed in float32, a norm after
attention and around the MLP, GELU-tanh, scaled embeddings, interleaved local sliding-window and global layers
with their own rotary bases, ``query_pre_attn_scalar``). Anything else is :class:`EngineUnsupported`: the
replica serves it through transformers' ``generate``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


class EngineUnsupported(ValueError):
    """The model's architecture is not one the engine's step implements."""


@dataclass
class Family:
    """The per-family pieces of the engine's step (every field a plain value the step branches on once)."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    eps: float
    gemma_norms: bool  # (1 + w), in float32; post-attention and pre/post-feedforward norms
    qk_norm: bool  # RMSNorm of each q and k head before rotary (Qwen 3, Gemma 3)
    activation: str  # "silu" or "gelu_tanh"
    scale: float  # attention score scale
    windows: list[int]  # per layer: sliding window in positions (0: full attention)
    layer_types: list[str]  # per layer: which rotary table it reads
    final_softcap: float | None


def describe(model) -> Family:
    """The family of a transformers causal LM, or EngineUnsupported naming why not."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise EngineUnsupported(f"model_type {kind!r}: the decode engine implements {', '.join(SUPPORTED)}")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise EngineUnsupported(f"head_dim {head_dim}: the decode engine needs a power of two of at least 16")
    gemma = kind == "gemma3_text"
    if gemma and getattr(cfg, "attn_logit_softcapping", None):
        raise EngineUnsupported("attention logit soft-capping is not implemented by the decode engine")
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise EngineUnsupported(f"activation {act}: the decode engine implements silu and gelu_pytorch_tanh")
    layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    scale = (cfg.query_pre_attn_scalar ** -0.5) if gemma else head_dim ** -0.5
    return Family(kind, heads, getattr(cfg, "num_key_value_heads", None) or heads, head_dim, cfg.hidden_size,
                  float(getattr(cfg, "rms_norm_eps", 1e-6)), gemma, kind in ("qwen3", "gemma3_text"),
                  "silu" if act == "silu" else "gelu_tanh", scale, _windows(cfg, kind, layer_types), layer_types,
                  getattr(cfg, "final_logit_softcapping", None))


def _windows(cfg, kind: str, layer_types: list[str]) -> list[int]:
    """Each layer's sliding window (transformers: position j is seen from i when i - window < j <= i)."""
    window = getattr(cfg, "sliding_window", None) or 0
    if kind == "mistral":
        return [window] * cfg.num_hidden_layers
    if kind in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
        return [0] * cfg.num_hidden_layers
    return [window if t == "sliding_attention" else 0 for t in layer_types]


def rotary_tables(model, max_len: int, device, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos and sin [max_len, head_dim] per layer type, as the model's own rotary embedding computes them (rope
    scaling included): Gemma 3's local layers use their own base."""
    inner = model.model
    rot = inner.rotary_emb
    pos = torch.arange(max_len, device=device)[None]
    dummy = torch.zeros(1, device=device, dtype=dtype)
    types = sorted(set(getattr(model.config, "layer_types", None) or ["full_attention"]))
    out = {}
    for t in types:
        if "layer_type" in inspect.signature(rot.forward).parameters:
            cos, sin = rot(dummy, pos, layer_type=t)
        elif t == "sliding_attention" and hasattr(inner, "rotary_emb_local"):
            cos, sin = inner.rotary_emb_local(dummy, pos)
        else:
            cos, sin = rot(dummy, pos)
        out[t] = (cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous())
    return out


def projections(layer) -> dict[str, list[torch.nn.Linear]]:
    """A decoder layer's linear layers in the engine's fused groups: q/k/v, output, gate/up, down."""
    a, m = layer.self_attn, layer.mlp
    return {"qkv": [a.q_proj, a.k_proj, a.v_proj], "o": [a.o_proj], "gate_up": [m.gate_proj, m.up_proj],
            "down": [m.down_proj]}


# peft's module names for each fused group's parts, in the order the group concatenates them
PARTS = {"qkv": ["q_proj", "k_proj", "v_proj"], "o": ["o_proj"], "gate_up": ["gate_proj", "up_proj"],
         "down": ["down_proj"]}
