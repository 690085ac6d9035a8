"""Create a model of a known shape with random weights on the GPU and save it like a hub checkpoint.

    python bench/make_model.py OUT_DIR [--shape llama2-7b|llama3-8b|qwen3-8b|tiny] [--dtype bfloat16]

Shapes: llama2-7b (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000: 6.7B parameters);
llama3-8b (32 layers, 8 KV heads, intermediate 14336, vocab 128,256, Llama 3's rope scaling: 8.0B); qwen3-8b
(36 layers, 8 KV heads, q/k norms, intermediate 12288, vocab 151,936: 8.2B).
The weights' values do not change speed, so these stand in for the hub models where nothing can be downloaded.
The tokenizer is a byte-level BPE trained on the BC5CDR words shipped in data/ (vocab capped at 32000),
with a chat template, so the model loads through the same from_pretrained path as a hub model.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=768, vocab_size=32000, max_position_embeddings=4096),
}


def corpus() -> list[str]:
    sents, cur = [], []
    with gzip.open(ROOT / "data/bc5cdr/train.conll.gz", "rt") as f:
        for line in f:
            if line.strip():
                cur.append(line.split("\t")[0])
            elif cur:
                sents.append(" ".join(cur))
                cur = []
    return sents + [(ROOT / "README.md").read_text()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.data.base import train_tokenizer

    out = Path(args.out)
    if (out / "config.json").exists():
        print(f"{out}: exists")
        return
    t0 = time.perf_counter()
    shape = dict(SHAPES[args.shape])
    tok = train_tokenizer(corpus(), vocab_size=min(shape["vocab_size"], 32000))  # a corpus this small gives fewer
    cfg = AutoConfig.for_model(shape.pop("model_type", "llama"), **shape, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, args.dtype))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"{out}: {args.shape}, {n / 1e9:.2f}B parameters, {args.dtype}, built in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
