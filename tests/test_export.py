"""GGUF export, checked by an independent implementation: llama.cpp itself (the xllamacpp wheel) loads each file,
tokenizes like the transformers tokenizer, and its greedy tokens agree with the merged transformers model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "models" / "constitution-tiny-llama"
CONFIG = ROOT / "configs" / "constitution-qa-tiny.yaml"
# q8_0 must agree on >= 90% of greedy positions (the bar); q4_k_m is reported, with a floor that only
# a broken quantizer or tensor layout would miss.
FLOOR = {"f16": 0.9, "q8_0": 0.9, "q4_k_m": 0.5}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir with a LoRA adapter on the shipped constitution base: B small and non-zero (as after a short
    training), so the merge changes every projection. (A random B ten times larger, std 0.02, turns the model's
    greedy choices into near-ties: there f16 still agrees 100% but q8_0 84%, measured.)"""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("export") / "constitution-qa-tiny"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.005)
    peft.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(BASE).save_pretrained(run / "adapter")
    return run


@pytest.fixture(scope="module")
def heldout(articles):
    """The config's test-split questions, split as the pipeline splits them (without starting Ray here: Ray Data
    state left in this process breaks the multi-node tests' later connection to another cluster)."""
    from orchestrator.core.config import load_config
    from orchestrator.data.pipelines import qa_pairs
    from orchestrator.data.splits import split_for

    cfg = load_config(CONFIG, [])
    return split_for(cfg, qa_pairs(cfg, [a.to_row() for a in articles]))["test"]


def overrides(run: Path) -> list[str]:
    return [f"output_dir={run.parent}", "data.qa.max_articles=40"]


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m", "f16"])
def test_gguf_loads_in_llama_cpp_and_agrees_with_the_merged_model(run_dir, heldout, quant):
    import gguf

    from orchestrator.artifacts.export import export_gguf
    from orchestrator.core.config import load_config

    r = export_gguf(load_config(CONFIG, overrides(run_dir)), run_dir / "adapter", quant, check=6, rows=heldout)
    path = Path(r["path"])
    assert path == run_dir / "gguf" / f"constitution-qa-tiny-{quant}.gguf" and path.stat().st_size == r["bytes"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    check = r["llama_cpp"]
    assert check["prompts"] == 6 and check["greedy_agreement"] >= FLOOR[quant], check
    print(f"{quant}: llama.cpp greedy agreement {check['greedy_agreement']:.3f}, {r['bytes'] / 2**20:.1f} MiB")

    meta = gguf.GGUFReader(str(path))
    field = lambda k: meta.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "gpt2"
    tokenizer_cfg = json.loads((BASE / "tokenizer.json").read_text())
    assert len(field("tokenizer.ggml.tokens")) == 4096 and field("tokenizer.ggml.eos_token_id") == 2
    assert field("tokenizer.chat_template") == (BASE / "chat_template.jinja").read_text()
    assert len(field("tokenizer.ggml.merges")) == len(tokenizer_cfg["model"]["merges"])
    kinds = {t.tensor_type.name for t in meta.tensors}
    assert {"f16": {"F16", "F32"}, "q8_0": {"Q8_0", "F32"}}.get(quant, {"Q4_K", "Q6_K"}) <= kinds
    card = (path.parent / "README.md").read_text()
    assert f"`{path.name}`: quantization {quant}, {r['bytes'] / 2**20:.1f} MiB; llama.cpp greedy tokens agree" in card
    assert json.loads(path.with_suffix(".json").read_text())["quant"] == quant


def test_llama_cpp_tokenizes_like_transformers(run_dir):
    """The vocabulary, merges and pre-tokenizer written into the file give llama.cpp the same token ids."""
    import httpx
    import xllamacpp
    from transformers import AutoTokenizer

    from orchestrator.artifacts.export import run_export

    path = run_dir / "gguf" / "constitution-qa-tiny-q8_0.gguf"
    if not path.exists():
        run_export(CONFIG, run_dir / "adapter", overrides(run_dir), quant="q8_0", check=0)
    tok = AutoTokenizer.from_pretrained(BASE)
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = 256
    server = xllamacpp.Server(params)
    url = server.listening_address.rstrip("/") + "/tokenize"
    texts = ["What does Article 16 of the Constitution of Nepal provide?",
             "(1) Every person shall have the right to live with dignity.  Tabs\tand 1,234 numbers; ünïcode — dash",
             "The President shall be the head of state of Nepal.\n\nHe or she"]
    for text in texts:
        got = httpx.post(url, json={"content": text, "add_special": False}, timeout=60).json()["tokens"]
        assert got == tok(text, add_special_tokens=False)["input_ids"], text
    del server


def test_unsupported_inputs_fail_before_any_work(run_dir, tmp_path):
    """Wrong task, an architecture llama.cpp's Llama layout does not cover, and a missing tokenizer: one line
    each, naming what is missing, and no file written."""
    from transformers import GPT2Config

    from orchestrator.artifacts.export import run_export
    from orchestrator.core.config import ConfigError

    with pytest.raises(ConfigError, match="model.task is token_classification; GGUF export is for causal"):
        run_export(ROOT / "configs/medical-ner-tiny.yaml", run_dir / "adapter", overrides(run_dir))

    def adapter_on(base: Path, name: str) -> Path:
        """The test adapter, recording ``base`` as its base, without a tokenizer of its own."""
        out = tmp_path / name
        out.mkdir()
        (out / "adapter_model.safetensors").write_bytes((run_dir / "adapter/adapter_model.safetensors").read_bytes())
        record = json.loads((run_dir / "adapter/adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**record, "base_model_name_or_path": str(base)}))
        return out

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    with pytest.raises(ConfigError, match="architecture GPT2LMHeadModel is not supported"):
        run_export(CONFIG, adapter_on(gpt2, "on-gpt2"), overrides(run_dir))

    bare_base = tmp_path / "base"
    bare_base.mkdir()
    for f in ("config.json", "model.safetensors.index.json"):
        (bare_base / f).write_bytes((BASE / f).read_bytes())
    with pytest.raises(ConfigError, match=r"no tokenizer.json in .*on-bare nor in .*base"):
        run_export(CONFIG, adapter_on(bare_base, "on-bare"), overrides(run_dir))
    assert not list(tmp_path.rglob("*.gguf"))

    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "export", "configs/medical-ner-tiny.yaml",
                          "--adapter", str(run_dir / "adapter"), "--quant", "q4_k_m", "--set",
                          f"output_dir={run_dir.parent}"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "GGUF export is for causal language models" in out.stderr
