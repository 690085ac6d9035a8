"""GGUF export, checked by an independent implementation: llama.cpp itself (the xllamacpp wheel) loads each file,
tokenizes like the transformers tokenizer, and its greedy next tokens agree with the merged transformers model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "models" / "constitution-tiny-llama"
CONFIG = ROOT / "configs" / "constitution-qa-tiny.yaml"
# llama.cpp's greedy next token after the prompt and each prefix of the merged model's greedy continuation
# (teacher-forced: a free run shifts every later position after one near-tie; on this fixture q4_k_m agrees
# 96% teacher-forced but 48% free-running, measured). q8_0 must agree on >= 90% (the bar); q4_k_m's
# floor is one only a broken quantizer or tensor layout would miss.
FLOOR = {"f16": 0.97, "q8_0": 0.95, "q4_k_m": 0.85}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, articles):
    """A run dir with a LoRA adapter on the shipped constitution base after a short real training: 40 AdamW
    steps on chat-formatted training-split QA pairs (7 s), so the merge changes every projection and the model
    answers in the chat format. (The base alone never saw that format; with a random small B its greedy
    choices on chat prompts are near-ties, where f16 still agrees 100% but q8_0 86%, measured.)"""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.core.config import load_config
    from orchestrator.data.base import qa_document
    from orchestrator.data.pipelines import qa_pairs
    from orchestrator.data.splits import split_for

    run = tmp_path_factory.mktemp("export") / "constitution-qa-tiny"
    cfg = load_config(CONFIG, [])
    pairs = split_for(cfg, qa_pairs(cfg, [a.to_row() for a in articles]))["train"]
    tok = AutoTokenizer.from_pretrained(BASE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=3e-3)
    peft.train()
    for step in range(40):
        docs = [qa_document(tok, pairs[(step * 8 + i) % len(pairs)]) for i in range(8)]
        enc = tok(docs, return_tensors="pt", padding=True, truncation=True, max_length=128, add_special_tokens=False)
        peft(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    peft.save_pretrained(run / "adapter")
    tok.save_pretrained(run / "adapter")
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
    assert check["prompts"] == 6 and check["next_token_agreement"] >= FLOOR[quant], check
    print(f"{quant}: llama.cpp next-token agreement {check['next_token_agreement']:.3f}, greedy "
          f"{check['greedy_agreement']:.3f}, {r['bytes'] / 2**20:.1f} MiB")

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


FAMILY_QUESTIONS = ["What does Article 16 provide?", "Who elects the President?", "What is citizenship?",
                    "Which article deals with the judiciary?", "What are fundamental rights?",
                    "How is the parliament formed?", "What does the preamble say?", "Who appoints the Chief Justice?",
                    "What are the duties of citizens?", "How are provinces governed?",
                    "What is the official language?", "What rights do women have?"]


def family_config(kind: str, vocab: int, tok):
    """Six layers, grouped-query attention, the shipped byte-level BPE tokenizer; Llama 3's rope scaling, Qwen 3's
    q/k norms and wide heads, Gemma 3's norms, tied head and interleaved sliding-window layers."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=256, max_position_embeddings=1024,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "llama3":
        return tf.LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if kind == "qwen3":
        return tf.Qwen3Config(**common, head_dim=64, tie_word_embeddings=False)
    return tf.Gemma3TextConfig(**common, head_dim=32, sliding_window=16, query_pre_attn_scalar=32)


@pytest.mark.parametrize("family", ["llama3", "qwen3", "gemma3"])
def test_each_family_exports_and_llama_cpp_agrees(family, tmp_path, constitution_pages):
    """A tiny model of each family, pre-trained 200 steps on the constitution (random weights make every greedy
    choice a near-tie), with a LoRA adapter: its q8_0 file loads in llama.cpp under the family's own architecture
    and llama.cpp's greedy next token agrees with the merged model's on >= 90% of positions."""
    import gguf
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.artifacts.export import export_gguf
    from orchestrator.core.config import load_config
    from orchestrator.data.base import pretrain

    tok = AutoTokenizer.from_pretrained(BASE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, len(tok), tok))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    pretrain(model, tok, ["\n".join(lines) for _, lines in constitution_pages[:60]], 200, seq_len=128, batch_size=8)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.005)
    peft.save_pretrained(tmp_path / "run" / "adapter")
    tok.save_pretrained(tmp_path / "run" / "adapter")
    cfg = load_config(CONFIG, [f"model.name_or_path={tmp_path / 'base'}", "model.build_tiny=false",
                               f"output_dir={tmp_path}"])
    rows = [{"question": q, "answer": ""} for q in FAMILY_QUESTIONS]
    r = export_gguf(cfg, tmp_path / "run" / "adapter", "q8_0", check=12, rows=rows)
    assert r["architecture"] == {"llama3": "llama"}.get(family, family)
    assert r["llama_cpp"]["next_token_agreement"] >= 0.9, r["llama_cpp"]
    meta = gguf.GGUFReader(r["path"])
    names = {t.name for t in meta.tensors}
    if family == "llama3":
        assert "rope_freqs.weight" in names  # Llama 3's rope scaling, as llama.cpp reads it
    if family in ("qwen3", "gemma3"):
        assert "blk.0.attn_q_norm.weight" in names and "blk.0.attn_k_norm.weight" in names
    if family == "gemma3":
        assert meta.fields["gemma3.attention.sliding_window"].contents() == 16 and "output.weight" not in names


def test_export_refuses_what_llama_cpp_cannot_run(tmp_path):
    """A sliding window llama.cpp's Llama layout cannot apply, and a rope scaling this exporter does not write:
    one line each, before any work."""
    import transformers as tf

    from orchestrator.artifacts.export import unsupported_by_llama_cpp

    mistral = tf.MistralConfig(sliding_window=64, max_position_embeddings=1024)
    assert "sliding window of 64 positions" in unsupported_by_llama_cpp(mistral, "llama")
    assert unsupported_by_llama_cpp(tf.MistralConfig(sliding_window=None), "llama") is None
    dynamic = tf.LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "rope scaling 'dynamic'" in unsupported_by_llama_cpp(dynamic, "llama")
    assert unsupported_by_llama_cpp(tf.Qwen3Config(), "qwen3") is None
