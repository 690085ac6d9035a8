"""Tiny random models of each family the engine implements (2-3 layers, grouped-query attention), with norms and
biases moved off their defaults so a wrong formula shows, and the reference greedy decoding they are held to."""

from __future__ import annotations

import torch

FAMILIES = ("llama3", "mistral", "qwen2", "qwen3", "gemma3")
COMMON = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=256)


def config(kind: str):
    import transformers as tf

    if kind == "llama3":
        return tf.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if kind == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=12)
    if kind == "qwen2":
        return tf.Qwen2Config(**COMMON)
    if kind == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=32)
    if kind == "gemma3":
        return tf.Gemma3TextConfig(**COMMON, head_dim=32, sliding_window=12, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    raise ValueError(kind)


def make(kind: str, dtype=torch.float64, seed: int = 0):
    """A random model of ``kind`` in eval mode, its norm weights and biases perturbed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(kind)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    model.generation_config.eos_token_id = None
    return model


def prompts(n: int, vocab: int = 300) -> list[list[int]]:
    """Prompts of 5, 14, 23, ... tokens."""
    return [[(i * 7 + j * 3) % vocab for j in range(5 + 9 * i)] for i in range(n)]


def reference(model, ids: list[int], new: int) -> list[int]:
    """transformers' greedy generate, every new token kept (no EOS)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


class CharTokenizer:
    """Enough of a tokenizer for the engine's detokenization: one letter per token id."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def run_all(engine, jobs: list[tuple[list[int], object, str | None]], timeout: float = 300) -> list:
    """Submit every (prompt, Sampling, adapter) at once; the sequences once all finished."""
    import threading

    seqs, done = [], []
    for ids, params, adapter in jobs:
        ev = threading.Event()
        seqs.append(engine.submit(ids, params, lambda e, ev=ev: "finish_reason" in e and ev.set(), adapter))
        done.append(ev)
    for ev in done:
        assert ev.wait(timeout), "request never finished"
    return seqs


def random_adapters(base_dir, out_dir, dtype=torch.float64) -> dict[str, str]:
    """Three LoRA adapters of a saved base: all-linear r=8, three projections r=8, all-linear r=4 (B not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for a, (targets, r) in enumerate([("all-linear", 8), (["q_proj", "v_proj", "down_proj"], 8), ("all-linear", 4)]):
        torch.manual_seed(10 + a)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.mul_(3.0)
        peft.save_pretrained(f"{out_dir}/ad{a}")
        paths[f"ad{a}"] = f"{out_dir}/ad{a}"
    return paths
