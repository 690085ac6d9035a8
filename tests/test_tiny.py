"""The embedded tiny base: pre-training on the corpus text makes it a language model of that text."""

from __future__ import annotations


def test_pretraining_lowers_the_loss_on_corpus_text(constitution_pages):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.data.base import pretrain, train_tokenizer

    texts = ["\n".join(lines) for _, lines in constitution_pages]
    tok = train_tokenizer(texts, vocab_size=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=128))
    losses = pretrain(model, tok, texts, steps=40, seq_len=64, batch_size=8, lr=5e-3)
    assert len(losses) == 40 and not model.training
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5  # 6.7 -> 5.2 when measured


def test_the_shipped_base_learnt_the_training_split_and_nothing_held_out(ray_local):
    """The shipped base's QA pairs are exactly the fine-tune's training split (same rules, same seeded split),
    and its build record matches the data shipped beside it (a change to the rules shows here)."""
    import hashlib
    import json

    from orchestrator.core.config import load_config
    from orchestrator.data.base import base_corpus
    from orchestrator.data.pipelines import causal_lm_rows

    from .conftest import ROOT

    cfg = load_config(ROOT / "configs/constitution-qa-tiny.yaml", [])
    texts, qa, record = base_corpus(cfg)
    raw, _, _ = causal_lm_rows(cfg)
    assert qa == raw["train"] and len(texts) == 240
    held = {(r["question"], r["answer"]) for r in raw["validation"] + raw["test"]}
    assert not held & {(r["question"], r["answer"]) for r in qa}

    build = json.loads((ROOT / cfg.model.name_or_path / "build.json").read_text())
    pdf = ROOT / "data/constitution/constitution-of-nepal-2015-en.pdf"
    assert build["data"] == record["data"]
    assert build["data"]["documents"][0]["sha256"] == hashlib.sha256(pdf.read_bytes()).hexdigest()
    assert build["pretraining"]["steps"] == cfg.model.tiny_pretrain_steps
    assert build["pretraining"]["final_loss"] < 0.2 < 8 < build["pretraining"]["first_loss"]
