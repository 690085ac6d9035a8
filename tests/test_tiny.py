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


def test_the_shipped_base_learnt_the_document_and_no_questions(ray_local):
    """The shipped base was pre-trained on the constitution's articles only: no QA pair of any split (the demo's
    fine-tune is what teaches it to answer), and its build record matches the data shipped beside it."""
    import hashlib
    import json

    from orchestrator.core.config import load_config
    from orchestrator.data.base import base_corpus
    from orchestrator.data.pipelines import causal_lm_rows

    from .conftest import ROOT

    cfg = load_config(ROOT / "configs/constitution-qa-tiny.yaml", [])
    assert not cfg.model.tiny_pretrain_qa
    texts, documents, qa, record = base_corpus(cfg)
    _, _, n_articles = causal_lm_rows(cfg)
    assert qa == [] and len(texts) == 240 and n_articles == 308
    assert sum(d.split("\n")[1].startswith("Article ") for d in documents if d.startswith("Part ")) == 308
    assert any(d.startswith("Part 3: Fundamental Rights and Duties\nArticle 16: Right to live with dignity\n(1) Every")
               for d in documents)
    assert "Article 16 (Right to live with dignity), clause (2):\nNo law shall be made providing for the death " \
           "penalty to any one." in documents

    build = json.loads((ROOT / cfg.model.name_or_path / "build.json").read_text())
    pdf = ROOT / "data/constitution/constitution-of-nepal-2015-en.pdf"
    assert build["data"] == record["data"] and build["pretraining"]["qa_pairs"] == 0
    assert build["pretraining"]["texts"] == len(documents)
    assert build["data"]["documents"][0]["sha256"] == hashlib.sha256(pdf.read_bytes()).hexdigest()
    assert build["pretraining"]["steps"] == cfg.model.tiny_pretrain_steps
    assert build["pretraining"]["final_loss"] < 0.2 < 8 < build["pretraining"]["first_loss"]
