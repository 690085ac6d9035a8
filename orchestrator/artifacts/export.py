"""`orchestrator export CONFIG --adapter DIR --format gguf --quant f16|q8_0|q4_k_m`: the merged model as one
GGUF file for llama.cpp.

The adapter is merged into its 16-bit base in memory (:func:`orchestrator.artifacts.merge.merged_model`), the tensors are
renamed to llama.cpp's names (Q and K rows permuted to its rotary layout), the tokenizer (byte-level BPE:
vocabulary, merges, special ids) and chat template go into the file's metadata, and the file is written
beside its final name and renamed into place. ``f16`` and ``q8_0`` are written by the ``gguf`` package (llama.cpp's
own Python writer and reference quantizer); ``q4_k_m`` uses llama.cpp's C quantizer from the ``xllamacpp``
wheel (Q4_K, with Q6_K for the output and for half of the value and down projections, as llama.cpp's
Q4_K_M does). When llama.cpp is importable the file is then loaded by it and its greedy tokens are compared
with the merged transformers model's on held-out prompts, free-running and teacher-forced; ``export.json``
and the card record the result.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from orchestrator.artifacts.adapters import open_adapter, require_adapter
from orchestrator.core.config import ConfigError, RunConfig
from orchestrator.core.io import atomic_path, atomic_write_text
from orchestrator.core.runtime import quiet

Quant = Literal["f16", "q8_0", "q4_k_m"]
QUANTS: tuple[Quant, ...] = ("f16", "q8_0", "q4_k_m")
# transformers architecture -> llama.cpp architecture (the gguf package's tables name every tensor)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3"}
PERMUTED = {"llama"}  # llama.cpp rotates interleaved pairs there (transformers rotates halves): q/k rows permuted
NORM_SHIFT = {"gemma3": 1.0}  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w
# llama.cpp's pre-tokenizer names for the byte-level BPE splits it knows.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")  # Qwen 2 / 3: digits one at a time
EXTRA = "pip install '.[export]'"


# ---------------------------------------------------------------- what can be exported (checked before any work)

def _import(name: str, what: str):
    try:
        return __import__(name)
    except ImportError:
        raise ConfigError(f"export: {what} needs the {name} package ({EXTRA})") from None


def tokenizer_file(adapter: Path, base: str) -> Path:
    for d in (adapter, Path(base)):
        if (d / "tokenizer.json").is_file():
            return d / "tokenizer.json"
    raise ConfigError(f"export: no tokenizer.json in {adapter} nor in {base}: GGUF carries the tokenizer's "
                      "vocabulary and merges (save the tokenizer with the adapter, or use a base that has one)")


def pre_tokenizer(tok: dict, where: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, or a one-line error naming what it is."""
    model = tok.get("model", {}).get("type")
    pre = tok.get("pre_tokenizer") or {}
    if model != "BPE" or not json.dumps(pre).count('"ByteLevel"'):
        kind = "SentencePiece/Unigram" if model == "Unigram" or (model == "BPE" and tok["model"].get("byte_fallback")) else model
        raise ConfigError(f"export: {where}: a {kind} tokenizer (pre-tokenizer {pre.get('type')}); this exporter writes "
                          "byte-level BPE tokenizers only")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    regex = splits[0].get("pattern", {}).get("Regex") if len(splits) == 1 else None
    if regex in (LLAMA3_SPLIT, QWEN2_SPLIT):
        return "llama-bpe" if regex == LLAMA3_SPLIT else "qwen2"
    raise ConfigError(f"export: {where}: a byte-level BPE tokenizer with a pre-tokenizer llama.cpp is not told "
                      f"apart here ({json.dumps(pre)[:120]})")


def preflight(cfg: RunConfig, adapter: Path, quant: str) -> tuple[Any, Path, str]:
    """The base's config, the tokenizer file and its pre-tokenizer name; a one-line error for anything missing."""
    from transformers import AutoConfig

    if quant not in QUANTS:
        raise ConfigError(f"export: --quant {quant}: choose one of {', '.join(QUANTS)}")
    if cfg.model.task != "causal_lm":
        raise ConfigError(f"export: model.task is {cfg.model.task}; GGUF export is for causal language models")
    _import("gguf", "GGUF export")
    if quant == "q4_k_m":
        _import("xllamacpp", "q4_k_m (llama.cpp's k-quant quantizer)")
    base = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    arch = (base.architectures or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"export: {cfg.model.name_or_path}: architecture {arch} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    if why := unsupported_by_llama_cpp(base, ARCHITECTURES[arch]):
        raise ConfigError(f"export: {cfg.model.name_or_path}: {why}")
    tok_file = tokenizer_file(adapter, cfg.model.name_or_path)
    return base, tok_file, pre_tokenizer(json.loads(tok_file.read_text()), tok_file)


def rope_type(config) -> str:
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    return scaling.get("rope_type", scaling.get("type", "default")) or "default"


def unsupported_by_llama_cpp(config, arch: str) -> str | None:
    """What llama.cpp's ``arch`` cannot run of this config (one line), or None."""
    kind = rope_type(config)
    if kind not in ("default", "llama3", "linear"):
        return f"rope scaling {kind!r}: this exporter writes default, linear and Llama 3 rope scaling"
    window = getattr(config, "sliding_window", None)
    if arch in ("llama", "qwen2", "qwen3") and window and (arch == "llama" or getattr(config, "use_sliding_window",
                                                                                      False)):
        if window < config.max_position_embeddings:
            return (f"a sliding window of {window} positions: llama.cpp's {arch} architecture attends over the "
                    "whole context")
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping: llama.cpp's gemma3 architecture has none"
    return None


# ---------------------------------------------------------------- tensors

def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotary halves -> llama.cpp's interleaved pairs (as llama.cpp's converter does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, config, arch: str = "llama") -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) for every tensor of a merged model of llama.cpp architecture ``arch``,
    named by the gguf package's tensor map; plus Llama 3's rope frequency factors."""
    import gguf

    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    out = []
    for name, t in model.state_dict().items():
        if "rotary_emb" in name or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConfigError(f"export: tensor {name} has no llama.cpp name in its {arch} architecture")
        w = t.detach().float().cpu().numpy()
        if arch in PERMUTED and ".self_attn.q_proj." in name:
            w = _permute(w, heads)
        elif arch in PERMUTED and ".self_attn.k_proj." in name:
            w = _permute(w, kv)
        if name.endswith("norm.weight"):
            w = w + NORM_SHIFT.get(arch, 0.0)
        out.append((new, w))
    if rope_type(config) == "llama3":
        out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config)))
    return out


def llama3_rope_factors(config) -> np.ndarray:
    """Per frequency, how much Llama 3's rope scaling divides it: the default frequencies over the scaled ones,
    both as transformers computes them (llama.cpp multiplies each rotation's wavelength by these)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or config.rope_theta
    default = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    return (default / scaled.double().numpy()).astype(np.float32)


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third in between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, layers: int):
    """The GGML type a tensor is stored in for ``quant`` (llama.cpp's choices, with its fallbacks for rows
    that are not a whole number of blocks)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32
    if quant == "f16":
        return T.F16
    want = T.Q8_0
    if quant == "q4_k_m":
        want = T.Q4_K
        if name == "output.weight":
            want = T.Q6_K
        elif name.endswith(("attn_v.weight", "ffn_down.weight")) and _more_bits(int(name.split(".")[1]), layers):
            want = T.Q6_K
    fallback = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0, T.Q8_0: T.F16, T.Q5_0: T.F16}
    while want != T.F16 and shape[-1] % GGML_QUANT_SIZES[want][0]:
        want = fallback[want]
    return want


def _ggml_quantize(w: np.ndarray, qtype) -> np.ndarray:
    """llama.cpp's own quantizer (ggml_quantize_chunk, from the xllamacpp extension) for k-quants."""
    import xllamacpp
    from gguf import GGML_QUANT_SIZES

    lib = ctypes.CDLL(xllamacpp.xllamacpp.__file__)
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = w.shape
    src = np.ascontiguousarray(w, dtype=np.float32)
    dst = np.empty((rows, cols // block * size), dtype=np.uint8)
    written = fn(int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return dst


def encode_tensor(w: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return w.astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype in (T.Q8_0, T.Q5_0):
        return quants.quantize(w, qtype)
    return _ggml_quantize(w, qtype)


# ---------------------------------------------------------------- the file

def write_gguf(path: Path, model, config, tokenizer, tok_file: Path, pre: str, quant: str, name: str) -> dict:
    """Write the GGUF file at ``path`` (atomically) and return what went into it."""
    import gguf

    arch = ARCHITECTURES[(config.architectures or ["LlamaForCausalLM"])[0]]
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name)
        write_hyperparameters(w, config, arch, quant)
        n_vocab = write_vocabulary(w, config, tokenizer, tok_file, pre)
        counts: dict[str, int] = {}
        for tname, arr in gguf_tensors(model, config, arch):
            qtype = tensor_type(tname, arr.shape, quant, config.num_hidden_layers)
            w.add_tensor(tname, encode_tensor(arr, qtype), raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"architecture": arch, "tensor_types": counts, "vocab": n_vocab, "pre_tokenizer": pre}


def write_hyperparameters(w, config, arch: str, quant: str) -> None:
    """The shapes and settings llama.cpp reads for ``arch`` (keys prefixed by the architecture's name)."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    local = rope.get("sliding_attention") or {}
    rope = rope.get("full_attention", rope)  # per layer type (Gemma 3): the global layers' parameters
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(config.num_key_value_heads or heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(float(rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)))
    w.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope_type(config) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope.get("factor") or config.rope_scaling["factor"]))
    if arch == "gemma3":
        w.add_sliding_window(config.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
        if base := local.get("rope_theta") or getattr(config, "rope_local_base_freq", None):
            w.add_rope_freq_base_swa(float(base))
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(config.final_logit_softcapping)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_vocabulary(w, config, tokenizer, tok_file: Path, pre: str) -> int:
    """The byte-level BPE vocabulary, merges, special ids and chat template; returns the vocabulary size."""
    import gguf

    tok = json.loads(tok_file.read_text())
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok.get("added_tokens", [])}}
    n_vocab = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for t, i in vocab.items():
        tokens[i], types[i] = t, gguf.TokenType.NORMAL
    for a in tok.get("added_tokens", []):
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])])
    for kind in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{kind}_token_id")
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(tid)
    probe = tokenizer("a")["input_ids"]
    w.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    return n_vocab


# ---------------------------------------------------------------- the check by llama.cpp

def hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=model.config.pad_token_id)
            out.append(g[0, len(ids):].tolist())
    return out


@contextlib.contextmanager
def llama_cpp(path: Path, n_ctx: int = 1024) -> Iterator[Callable[[list[int], int], list[int]]]:
    """llama.cpp itself serving ``path`` (the xllamacpp wheel's embedded server on 127.0.0.1), as a function
    ``complete(token_ids, n)`` giving its ``n`` greedy next token ids (native ``/completion``, end of sequence
    ignored)."""
    import httpx
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = n_ctx
    params.n_parallel = 1
    server = xllamacpp.Server(params)
    url = server.listening_address.rstrip("/") + "/completion"

    def complete(ids: list[int], n: int) -> list[int]:
        r = httpx.post(url, json={"prompt": ids, "n_predict": n, "temperature": 0.0, "ignore_eos": True,
                                  "return_tokens": True, "cache_prompt": True}, timeout=120)
        if r.status_code != 200 or "tokens" not in r.json():
            raise RuntimeError(f"llama.cpp could not complete a prompt from {path}: HTTP {r.status_code} "
                               f"{r.text[:200]}")
        return list(r.json()["tokens"])

    try:
        yield complete
    finally:
        del server


def llama_cpp_check(path: Path, prompts: list[list[int]], ref: list[list[int]]) -> dict[str, Any]:
    """llama.cpp against the merged model's greedy continuations ``ref``: free-running (its own greedy tokens,
    compared position by position, so one near-tie shifts the rest) and teacher-forced (its greedy next token
    after the prompt and each prefix of ``ref``, as llama.cpp's KL-divergence tool counts "same top")."""
    n = max(map(len, ref), default=0)
    with llama_cpp(path, n_ctx=max(map(len, prompts), default=0) + n + 8) as complete:
        free = [complete(ids, n) for ids in prompts]
        forced = [[complete(ids + r[:k], 1)[0] for k in range(len(r))] for ids, r in zip(prompts, ref, strict=True)]
    return {"prompts": len(prompts), "new_tokens": n, "greedy_agreement": agreement(ref, free),
            "next_token_agreement": agreement(ref, forced)}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for s, t in zip(a, b, strict=True) for x, y in zip(s, t, strict=False))
    return same / max(1, sum(max(len(s), len(t)) for s, t in zip(a, b, strict=True)))


def prompts_for(cfg: RunConfig, tokenizer, rows: list[dict], limit: int) -> list[list[int]]:
    from orchestrator.data.tokenization import format_prompt_answer

    out = []
    for r in rows[:limit]:
        prompt, _ = format_prompt_answer(tokenizer, r["question"], None, cfg.data.chat_template, cfg.data.system_prompt)
        out.append(tokenizer(prompt, add_special_tokens=False)["input_ids"][-cfg.data.max_seq_length:])
    return out


# ---------------------------------------------------------------- entry

def export_gguf(cfg: RunConfig, adapter: str | Path, quant: Quant = "q8_0", out: str | Path | None = None,
                check: int = 8, new_tokens: int = 24, rows: list[dict] | None = None) -> dict[str, Any]:
    """Merge ``adapter``, write ``RUN_DIR/gguf/NAME-QUANT.gguf`` (or ``out``), check it with llama.cpp on
    ``check`` held-out prompts (``rows``, default the config's test split; 0: no check) and record
    NAME-QUANT.json and the card line."""
    import torch

    from orchestrator.artifacts.merge import merged_model
    from orchestrator.data.prepare import heldout_rows
    from orchestrator.data.tokenization import load_tokenizer

    adapter = require_adapter(adapter)
    config, tok_file, pre = preflight(cfg, adapter, quant)
    path = Path(out) if out else adapter.parent / "gguf" / f"{cfg.name}-{quant}.gguf"
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(str(tok_file.parent))
    model = merged_model(cfg.model_copy(update={"quantization": cfg.quantization.model_copy(
        update={"compute_dtype": "float32"})}), adapter, "16bit", torch.device("cpu"))
    info = write_gguf(path, model, model.config, tokenizer, tok_file, pre, quant, cfg.name)
    result: dict[str, Any] = {"path": str(path), "file": path.name, "quant": quant, "bytes": path.stat().st_size,
                              "base": cfg.model.name_or_path, "adapter": str(adapter), **info,
                              "seconds": round(time.perf_counter() - t0, 1)}
    if check:
        if _has("xllamacpp"):
            prompts = prompts_for(cfg, tokenizer, rows if rows is not None else heldout_rows(cfg), check)
            result["llama_cpp"] = llama_cpp_check(path, prompts, hf_greedy(model, prompts, new_tokens))
        else:
            result["llama_cpp"] = {"skipped": f"xllamacpp is not installed ({EXTRA})"}
    atomic_write_text(path.with_suffix(".json"), json.dumps(result, indent=2))
    _card_line(path.parent, result)
    return result


def _has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _card_line(folder: Path, r: dict[str, Any]) -> None:
    """One line per exported file in the folder's README.md (the GGUF model card)."""
    card = folder / "README.md"
    lines = card.read_text().splitlines() if card.is_file() else [
        "# GGUF exports", "", "Merged model exported for llama.cpp (`llama-cli -m FILE`, or any GGUF runtime).", ""]
    lines = [x for x in lines if not x.startswith(f"- `{r['file']}`")]
    check = r.get("llama_cpp", {})
    agree = (f"; llama.cpp greedy tokens agree with the merged transformers model on "
             f"{check['greedy_agreement']:.1%} of {check['prompts'] * check['new_tokens']} positions, its next "
             f"token after the same prefix on {check['next_token_agreement']:.1%}" if "greedy_agreement" in check else "")
    lines.append(f"- `{r['file']}`: quantization {r['quant']}, {r['bytes'] / 2**20:.1f} MiB{agree}")
    atomic_write_text(card, "\n".join(lines) + "\n")


def run_export(config: str | Path, adapter: str | Path, overrides: list[str] | None = None, fmt: str = "gguf",
               quant: Quant = "q8_0", out: str | None = None, check: int = 8) -> dict[str, Any]:
    """Entry for `orchestrator export` and jobs/export.py."""
    if fmt != "gguf":
        raise ConfigError(f"export: --format {fmt}: only gguf is supported")
    cfg, adapter = open_adapter(config, adapter, overrides)  # the base built or checked before Ray starts
    quiet(adapter.parent / "ray.log")  # the libraries' output to the run's log file (-v: here)
    r = export_gguf(cfg, adapter, quant, out, check)
    check = r.get("llama_cpp", {})
    print(f"gguf: {r['path']} ({r['quant']}, {r['bytes'] / 2**20:.1f} MiB)"
          + (f"; llama.cpp greedy agreement {check['greedy_agreement']:.1%}, next token "
             f"{check['next_token_agreement']:.1%}" if "greedy_agreement" in check else ""))
    return r
