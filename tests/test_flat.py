"""Flat parameters (the CUDA-graphed step's optimizer layout) on the CPU: the LoRA weights become views of one
buffer per group, the optimizer steps those buffers exactly as it steps the separate tensors, its checkpoint
keeps the per-parameter format both ways, and the adapter still saves and loads."""

from __future__ import annotations

import pytest
import torch

from orchestrator.core.config import load_config, set_fields
from orchestrator.training.flat_params import FlatParameters
from orchestrator.training.loop import make_optimizer
from orchestrator.training.strategy import DDPStrategy

from .conftest import ROOT


def _lora(tiny_model_dir, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             modules_to_save=["norm"]))  # a vector: the undecayed group
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.02)
    return model


def _cfg(optimizer: str):
    return set_fields(load_config(ROOT / "configs/constitution-qa-tiny.yaml"),
                      {"train.optimizer": optimizer, "train.weight_decay": 0.1, "train.max_grad_norm": 0.5})


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _set_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad.copy_(torch.randn(p.shape, generator=g))


def _mix_dtypes(model) -> None:
    """The q_proj LoRA weights in float64: a decay group of two dtypes (two flat buffers)."""
    for name, p in model.named_parameters():
        if p.requires_grad and "q_proj" in name:
            p.data = p.data.double()


@pytest.mark.parametrize("optimizer,mixed", [("adamw_torch", False), ("adamw_torch", True),
                                             ("paged_adamw_32bit", False), ("paged_adamw_8bit", False)])
def test_flat_step_equals_the_per_parameter_step_and_checkpoints_per_parameter(tiny_model_dir, optimizer, mixed):
    cfg = _cfg(optimizer)
    ref_model, flat_model = _lora(tiny_model_dir), _lora(tiny_model_dir)
    if mixed:
        _mix_dtypes(ref_model)
        _mix_dtypes(flat_model)
    ref, params = _trainable(ref_model), _trainable(flat_model)
    flat = FlatParameters(params)
    assert [len(ps) for ps, _ in flat.groups] == [sum(p.ndim >= 2 for p in ref), sum(p.ndim < 2 for p in ref)]
    assert len(flat.flats) == 2 + mixed and [f.dtype for f in flat.flats][-1] == torch.float32
    for p, r in zip(params, ref, strict=True):  # values kept; data and gradients are views of the buffers
        assert torch.equal(p, r) and not p.grad.any()
    ordered = [p for ps, _ in flat.groups for p in ps]
    for p, (b, offset) in zip(ordered, flat.where, strict=True):
        assert p.data_ptr() == flat.flats[b].data_ptr() + offset * p.element_size()
        assert p.grad.data_ptr() == flat.grads[b].data_ptr() + offset * p.element_size()
    ref_opt, flat_opt = make_optimizer(cfg, ref), make_optimizer(cfg, params, flat)
    assert flat.stepped_flat(flat_opt) == (optimizer != "paged_adamw_8bit")
    ref_strategy = DDPStrategy(cfg, ref_model, ref_opt, 1, torch.device("cpu"))
    flat_strategy = DDPStrategy(cfg, flat_model, flat_opt, 1, torch.device("cpu"), flat=flat)
    for p in ref:
        p.grad = torch.zeros_like(p)
    for step in range(3):
        _set_grads(ref, step)
        _set_grads(params, step)
        assert torch.allclose(ref_strategy.step(), flat_strategy.step(), rtol=1e-5)  # clipped at 0.5
        assert all(p.grad is not None and not p.grad.any() for p in params)  # zeroed in place, still views
        for r in ref:
            r.grad = torch.zeros_like(r)
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)
    # The checkpoint: the format an optimizer over the separate tensors saves, with the same values
    saved, expect = flat_strategy.optimizer_state(), ref_opt.state_dict()
    assert [g["params"] for g in saved["param_groups"]] == [g["params"] for g in expect["param_groups"]]
    assert saved["param_groups"][0]["weight_decay"] == 0.1 and saved["param_groups"][1]["weight_decay"] == 0.0
    assert saved["state"].keys() == expect["state"].keys()
    for i in expect["state"]:
        torch.testing.assert_close(saved["state"][i], expect["state"][i], rtol=1e-5, atol=1e-7)
    # ... which resumes in either layout, and both continue alike
    resumed_model = _lora(tiny_model_dir, seed=1)
    if mixed:
        _mix_dtypes(resumed_model)
    resumed = _trainable(resumed_model)
    with torch.no_grad():
        for p, r in zip(resumed, ref, strict=True):
            p.copy_(r)
    resumed_flat = FlatParameters(resumed)
    resumed_strategy = DDPStrategy(cfg, resumed_model, make_optimizer(cfg, resumed, resumed_flat), 1,
                                   torch.device("cpu"), flat=resumed_flat)
    resumed_strategy.load_optimizer_state(expect)
    flat_strategy.load_optimizer_state(saved)
    _set_grads(ref, 9)
    _set_grads(resumed, 9)
    ref_strategy.step()
    resumed_strategy.step()
    for p, r in zip(resumed, ref, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)


def test_flat_parameters_keep_backward_and_the_adapter_files(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _lora(tiny_model_dir)
    params = _trainable(model)
    flat = FlatParameters(params)
    ids = torch.arange(1, 17)[None]
    for _ in range(2):  # two backward passes accumulate into the flat gradient in place
        model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad.clone() for p in params]
    assert all(p.grad.data_ptr() - flat.grads[0].data_ptr() < flat.grads[0].nbytes for p in flat.groups[0][0])
    fresh = _lora(tiny_model_dir)
    fresh(input_ids=ids, labels=ids).loss.backward()
    for g, p in zip(grads, _trainable(fresh), strict=True):
        torch.testing.assert_close(g, 2 * p.grad, rtol=1e-4, atol=1e-6)
    model.save_pretrained(tmp_path / "adapter")  # views of one buffer, saved as separate tensors
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    for name, value in model.state_dict().items():
        if "lora_" in name:
            torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
