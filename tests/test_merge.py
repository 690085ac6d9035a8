"""Merging: 16-bit reload vs. dequantized NF4, fidelity measured, output loads with plain transformers."""

from __future__ import annotations

import json

import pytest

from orchestrator.artifacts.merge import merge_adapter
from orchestrator.core.config import validate_config

from .conftest import FIXTURES, PDF


def _cfg(model_dir, out):
    return validate_config({
        "name": "merge", "model": {"name_or_path": str(model_dir), "task": "causal_lm"},
        "quantization": {"bits": 4, "compute_dtype": "float32"}, "lora": {"r": 8, "alpha": 16},
        "data": {"format": "pdf", "train": [str(PDF)], "max_seq_length": 128}, "output_dir": str(out)})


ROWS = [{"question": "What does Article 16 provide?", "answer": "Every person shall have the right to live with dignity."},
        {"question": "Which article deals with citizenship?", "answer": "Article 10 (Citizenship), in Part 2."},
        {"question": "What is the official language?", "answer": "The Nepali language in the Devanagari script."}]


@pytest.mark.parametrize("method", ["16bit", "dequantized"])
def test_merge_writes_standalone_model_with_fidelity(tiny_model_dir, random_adapter, tmp_path, method):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model_dir, tmp_path)
    res = merge_adapter(cfg, random_adapter, tmp_path / "merged", ROWS, method=method)
    fid = res["fidelity"]
    assert set(fid) == {"16bit", "dequantized"} and fid["16bit"]["tokens"] > 20
    # The dequantized merge is the trained function itself (up to float rounding); the 16-bit reload is
    # close but not exact, because the adapter was trained against the NF4-rounded base.
    assert fid["dequantized"]["mean_kl"] < 1e-4 and fid["dequantized"]["top1_agreement"] > 0.99
    assert fid["dequantized"]["mean_kl"] < fid["16bit"]["mean_kl"]
    out = tmp_path / "merged"
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    card = (out / "README.md").read_text()
    assert f"**{method}**" in card and "top-1 agreement" in card and "(saved)" in card
    assert json.loads((out / "merge.json").read_text())["method"] == method
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["library_name"] == "transformers" and "base_model" not in data  # a local base
    assert str(tiny_model_dir) not in card and str(random_adapter) not in card  # no paths of this machine
    assert data["pipeline_tag"] == "text-generation" and "merged" in data["tags"] and data["license"] == "other"
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged).__name__ == "LlamaForCausalLM" and getattr(merged.config, "quantization_config", None) is None
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_merge_rejects_a_directory_without_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        merge_adapter(_cfg(tiny_model_dir, tmp_path), FIXTURES, tmp_path / "m", ROWS)

