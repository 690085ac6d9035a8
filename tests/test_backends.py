"""Training backends on the CPU: what `auto` picks, where a GPU backend refuses to run, the Unsloth backend's
host-side packing metadata and `all-linear` names. The training loop itself runs the reference backend in
test_train.py; the GPU backends' numerics against it are checked on a GPU by bench/backend_check.py."""

from __future__ import annotations

import sys

import pytest
import torch

from orchestrator.core.config import ConfigError, load_config, set_fields
from orchestrator.training.backends import UnslothBackend, linear_names, resolve

from .conftest import ROOT


def _cfg(**sets):
    return set_fields(load_config(ROOT / "configs/constitution-qa-tiny.yaml"), sets)


def test_auto_is_hf_without_a_gpu_and_gpu_backends_refuse_a_cpu_worker():
    cpu = torch.device("cpu")
    assert resolve(_cfg(), cpu) == "hf"
    assert resolve(_cfg(**{"train.backend": "hf"}), cpu) == "hf"
    gpu_cfg = _cfg(**{"train.backend": "unsloth", "scaling.use_gpu": True})
    with pytest.raises(ConfigError, match="train.backend=unsloth: this worker has no CUDA device"):
        resolve(gpu_cfg, cpu)
    # a GPU worker whose environment lacks Unsloth: named, with the extra that installs it
    if "unsloth" not in sys.modules:
        with pytest.raises(ConfigError, match=r"unsloth is not installed .*pip install '\.\[unsloth\]'"):
            resolve(gpu_cfg, torch.device("cuda", 0))
        assert resolve(_cfg(**{"scaling.use_gpu": True}), torch.device("cuda", 0)) == "hf"  # auto falls back


def test_unsloth_batches_carry_each_examples_length_from_the_host():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1, 0, 1]])
    batch = {"input_ids": pos + 5, "labels": pos + 5, "position_ids": pos, "num_tokens": torch.tensor([9, 9])}
    out = UnslothBackend().to_device(batch, torch.device("cpu"))
    assert out["packed_seq_lengths"].tolist() == [3, 2, 4, 5, 2, 2]
    assert out["packed_seq_lengths"].device.type == "cpu" and int(out["packed_seq_lengths"].sum()) == pos.numel()
    padded = UnslothBackend().to_device({"input_ids": pos, "attention_mask": pos >= 0}, torch.device("cpu"))
    assert "packed_seq_lengths" not in padded  # padded rows: Unsloth reads the attention mask


def test_all_linear_names_the_decoders_projections(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert linear_names(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_graphed_step_reads_example_boundaries_from_positions_and_buckets_them():
    from orchestrator.training.step_graph import bucket, example_lengths

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1, 0, 1]])
    assert example_lengths(pos).tolist() == [3, 2, 4, 5, 2, 2]  # the same boundaries the eager path sends
    assert [bucket(n) for n in (1, 8, 9, 32, 33, 84)] == [8, 8, 16, 32, 64, 128]


def test_each_micro_batch_replays_the_smallest_graph_that_fits_and_captures_stay_few():
    from orchestrator.training.step_graph import choose_graph, length_bound

    assert [length_bound(n, 8192) for n in (1, 1024, 1025, 2052, 8192)] == [1024, 1024, 2048, 3072, 8192]
    assert [length_bound(n, 512) for n in (1, 129, 512)] == [128, 256, 512]
    assert choose_graph([(8, 3072)], (8, 3072), 2) == ((8, 3072), None)  # made for this shape
    assert choose_graph([(8, 3072)], (16, 2048), 2) == ((16, 2048), None)  # room for one more
    kept = [(16, 2048), (8, 3072)]  # full: the cheapest that fits, or a new one in place of the oldest
    assert choose_graph(kept, (8, 2048), 2) == ((8, 3072), None)  # 8 x 3072 < 16 x 2048
    assert choose_graph(kept + [(512, 8192)], (8, 1024), 3) == ((8, 3072), None)
    assert choose_graph(kept, (32, 1024), 2) == ((32, 1024), (16, 2048))
    captures, have = 0, []
    for need in [(8, 2048), (16, 3072), (8, 3072), (16, 2048), (8, 1024)] * 20:  # a long run cycling shapes
        key, evict = choose_graph(have, need, 2)
        if evict:
            have.remove(evict)
        if key not in have:
            captures += 1
        else:
            have.remove(key)
        have.append(key)
        assert key[0] >= need[0] and key[1] >= need[1]
    assert captures == 2


def test_the_graphed_steps_chunked_loss_equals_cross_entropy_and_its_gradients():
    from orchestrator.training.step_graph import ChunkedCrossEntropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::3] = -100  # unlabelled (prompt, padding, packed boundaries)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = ChunkedCrossEntropy.apply(hidden, weight, labels, 8)  # 8 does not divide 37: a short last chunk
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert torch.allclose(got.double(), ref, atol=1e-6)
    for a, b in zip(got_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    frozen = weight.detach()  # a LoRA run's head: the gradient for the hidden states comes from the forward
    got = ChunkedCrossEntropy.apply(hidden, frozen, labels, 8)
    (got_hidden,) = torch.autograd.grad(got * 3.0, (hidden,))  # the upstream gradient scales it
    assert torch.allclose(got.double(), ref, atol=1e-6)
    assert torch.allclose(got_hidden, 3.0 * ref_grads[0], atol=1e-6)
    none = ChunkedCrossEntropy.apply(hidden, weight, torch.full_like(labels, -100), 8)
    assert none.item() == 0.0  # nothing labelled: a zero loss, not 0 / 0


def test_the_cuda_graph_step_is_on_by_default_only_where_it_can_run():
    from orchestrator.training.backends import graphed

    gpu = {"scaling.use_gpu": True}
    assert graphed(_cfg(**gpu), "unsloth")  # unset: on for Unsloth on packed causal-LM rows, dropout 0, DDP
    assert not graphed(_cfg(**gpu), "hf") and not graphed(_cfg(), "hf")  # other backends, CPU runs: eager
    assert not graphed(_cfg(**gpu, **{"lora.dropout": 0.1}), "unsloth")  # unset and cannot run: quietly off
    assert not graphed(_cfg(**gpu, **{"lora.modules_to_save": ["lm_head"]}), "unsloth")
    assert not graphed(_cfg(**gpu, **{"train.cuda_graph": False}), "unsloth")
    required = _cfg(**gpu, **{"train.cuda_graph": True})
    assert graphed(required, "unsloth")
    with pytest.raises(ConfigError, match="train.cuda_graph replays Unsloth's model, but this worker runs the hf"):
        graphed(required, "hf")  # asked for, and `auto` found no Unsloth in the worker
