"""Create a Llama-2-7B-shaped model with random weights on the GPU and save it like a hub checkpoint.

    python bench/make_model.py OUT_DIR [--shape llama2-7b|tiny] [--dtype bfloat16]

Shape llama2-7b: hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000 (6.7B parameters).
The weights' values do not change speed, so this stands in for Llama-2-7b where nothing can be downloaded.
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
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.data.base import train_tokenizer

    out = Path(args.out)
    if (out / "config.json").exists():
        print(f"{out}: exists")
        return
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus(), vocab_size=SHAPES[args.shape]["vocab_size"])
    cfg = LlamaConfig(**SHAPES[args.shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"{out}: {args.shape}, {n / 1e9:.2f}B parameters, {args.dtype}, built in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
