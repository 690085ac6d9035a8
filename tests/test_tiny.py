"""The embedded tiny base: pre-training on the corpus text makes it a language model of that text."""

from __future__ import annotations


def test_pretraining_lowers_the_loss_on_corpus_text(constitution_pages):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.tiny import pretrain, train_tokenizer

    texts = ["\n".join(lines) for _, lines in constitution_pages]
    tok = train_tokenizer(texts, vocab_size=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=128))
    losses = pretrain(model, tok, texts, steps=40, seq_len=64, batch_size=8, lr=5e-3)
    assert len(losses) == 40 and not model.training
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5  # 6.7 -> 5.2 when measured
