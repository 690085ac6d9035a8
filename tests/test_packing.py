"""Packing: rows never mix examples, position ids restart, and attention is isolated per example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.data.tokenization import IGNORE, encode_qa, fill_rows, pack, pad_batch


def _examples(tok, n=12):
    qs = [(f"What is Article {i} about?", f"It is about thing number {i}. " * (1 + i % 4)) for i in range(n)]
    return [encode_qa(tok, q, a, max_len=96) for q, a in qs]


def test_pack_never_crosses_example_boundaries(tiny_tokenizer):
    examples = _examples(tiny_tokenizer)
    rows = pack(examples, max_len=128, pad_id=tiny_tokenizer.pad_token_id)
    assert sum(r["num_examples"] for r in rows) == len(examples)
    assert len(rows) < len(examples)
    seen = []
    for r in rows:
        assert len(r["input_ids"]) == 128
        for k in range(r["num_examples"]):
            where = np.flatnonzero(r["seq_ids"] == k)
            assert (np.diff(where) == 1).all()  # contiguous
            assert (r["position_ids"][where] == np.arange(len(where))).all()  # restart at 0
            seen.append((tuple(r["input_ids"][where]), tuple(r["labels"][where])))
        pad = r["seq_ids"] == -1
        assert (r["labels"][pad] == IGNORE).all()
    assert sorted(seen) == sorted((tuple(e["input_ids"]), tuple(e["labels"])) for e in examples)


def test_rows_fill_to_the_last_slot_where_first_fit_decreasing_leaves_gaps():
    lengths = [5, 4, 3, 3, 3, 2]  # first-fit decreasing: [5, 4] [3, 3, 3] [2], three rows for 20 tokens
    rows = fill_rows(lengths, 10)
    assert sorted(sum(lengths[i] for i in r) for r in rows) == [10, 10]
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    rng = np.random.default_rng(0)  # 400 documents of 1-2k tokens into rows of 8,192: 95% full first-fit
    docs = [int(n) for n in rng.integers(1028, 2053, 400)]
    rows = fill_rows(docs, 8192)
    assert all(sum(docs[i] for i in r) <= 8192 for r in rows)
    assert sorted(i for r in rows for i in r) == list(range(len(docs)))
    assert sum(docs) / (len(rows) * 8192) > 0.99


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_separate_forwards(tiny_model_dir, tiny_tokenizer, attn):
    """No token sees another example: logits of a packed row equal each example run on its own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32).eval()
    examples = _examples(tiny_tokenizer, 5)
    row = pack(examples, max_len=512, pad_id=tiny_tokenizer.pad_token_id)[0]
    assert row["num_examples"] >= 3
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers skips packed-sequence detection.
        packed = model(input_ids=torch.tensor(row["input_ids"])[None], use_cache=False,
                       position_ids=torch.tensor(row["position_ids"])[None]).logits[0]
        for k in range(row["num_examples"]):
            idx = np.flatnonzero(row["seq_ids"] == k)
            alone = model(input_ids=torch.tensor(row["input_ids"][idx])[None]).logits[0]
            torch.testing.assert_close(packed[idx], alone, atol=1e-4, rtol=1e-4)
        # Sanity: with a plain causal mask over the whole row, later examples do change.
        k = row["num_examples"] - 1
        idx = np.flatnonzero(row["seq_ids"] == k)
        leaky = model(input_ids=torch.tensor(row["input_ids"])[None],
                      attention_mask=torch.ones(1, 512, dtype=torch.long)).logits[0]
        alone = model(input_ids=torch.tensor(row["input_ids"][idx])[None]).logits[0]
        assert not torch.allclose(leaky[idx], alone, atol=1e-3)


def test_pad_batch_pads_to_longest_and_masks():
    out = pad_batch({"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [8]]}, pad_id=0, multiple_of=4)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_chunked_loss_equals_the_models_loss_and_gradients(tiny_model_dir):
    """train.loss_chunk_tokens: the wrapper's loss and LoRA gradients match transformers' own loss on a
    4-bit + LoRA model, with packed rows (position_ids restart) and prompt tokens masked."""
    from orchestrator.core.config import validate_config
    from orchestrator.training.loss import ChunkedLossCausalLM, training_module
    from orchestrator.training.model import load_for_training

    cfg = validate_config({"name": "x", "model": {"name_or_path": str(tiny_model_dir), "task": "causal_lm"},
                           "quantization": {"bits": 4, "compute_dtype": "float32"}, "lora": {"r": 4, "dropout": 0.0},
                           "data": {"format": "pdf", "train": ["a.pdf"]}, "train": {"loss_chunk_tokens": 7}})
    model = load_for_training(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so gradients differ per path
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    ids = torch.randint(5, 500, (2, 40))
    labels = ids.clone()
    labels[:, :9] = -100  # a prompt
    labels[1, 20:26] = -100  # a second packed example's prompt
    pos = torch.cat([torch.arange(20), torch.arange(20)]).repeat(2, 1)
    wrapped = training_module(model, "causal_lm", cfg.train.loss_chunk_tokens)
    assert isinstance(wrapped, ChunkedLossCausalLM)
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in model.parameters()}

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = grads(lambda: model(input_ids=ids, labels=labels, position_ids=pos, use_cache=False).loss)
    loss, got = grads(lambda: wrapped(input_ids=ids, labels=labels, position_ids=pos).loss)
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
    assert ref.keys() == got.keys() and ref
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-7), n
