"""The decode engine's Triton step against its PyTorch (SDPA) step on a GPU: agreement and step time.

    python bench/engine_check.py --model DIR [--batches 1 8 32 64] [--tag TAG]

1. Agreement: both decoders prefill the same prompts (random tokens, lengths 100-300) and decode 32 greedy
   steps fed the same tokens; reported: the largest logit difference relative to the logits' spread, and
   the share of rows and steps whose argmax agrees.
2. Step time: each engine's captured decode graph replayed 50 times per batch size with the rows at
   positions spread over 200-328 (the serving bench's 200-token prompts, 128 new tokens), timed with CUDA
   events; the HBM bound counts the weights plus each row's KV cache once.
Writes bench/results/engine_check[_TAG].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve.engine import Engine

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    slots, max_len = max(args.batches), 512
    out: dict = {"device": torch.cuda.get_device_name(), "model": Path(args.model).name, "slots": slots,
                 "max_len": max_len, "torch": torch.__version__}
    engines = {}
    for name, kernels in (("triton", True), ("sdpa", False)):
        engines[name] = Engine(model, tok, slots=slots, max_len=max_len, use_kernels=kernels)
        engines[name].shutdown()  # only its decoder and graphs are used here
    assert engines["triton"].dec.kernels and not engines["sdpa"].dec.kernels

    with torch.inference_mode():
        n = 8
        lengths = torch.randint(100, 300, (n,), device=dev)
        ids = torch.randint(0, model.config.vocab_size, (n, 300), device=dev)
        for e in engines.values():
            e.dec.prefill(ids, lengths, torch.arange(n, device=dev))
        pos, cur = lengths.clone(), ids[torch.arange(n, device=dev), lengths - 1]
        worst, agree, total = 0.0, 0, 0
        for _ in range(32):
            a = engines["triton"].dec.decode(cur, pos, max_len)
            b = engines["sdpa"].dec.decode(cur, pos, max_len)
            worst = max(worst, ((a - b).abs().max() / (b.max() - b.min())).item())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += n
            cur, pos = b.argmax(-1), pos + 1
        out["agreement"] = {"steps": 32, "rows": n, "max_logit_diff_over_spread": worst,
                            "argmax_agreement": agree / total}
        print(json.dumps(out["agreement"]), flush=True)

        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        cfg = model.config
        kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        kv_per_token = 2 * cfg.num_hidden_layers * kv_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
        bw = {"H100": 3.35e12, "H200": 4.8e12}
        peak = next((v for k, v in bw.items() if k in out["device"]), None)
        out["steps"] = []
        for b in args.batches:
            positions = torch.linspace(200, 327, b, device=dev).long()
            row = {"batch": b}
            for name, e in engines.items():
                e.pos[:b] = positions
                span = e._bucket(e.span_buckets, int(positions.max()) + 1)
                g, _ = e.graphs[(e._bucket(e.batch_buckets, b), span)]
                times = []
                for _ in range(3):
                    g.replay()
                torch.cuda.synchronize()
                for _ in range(50):
                    s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    g.replay()
                    t.record()
                    t.synchronize()
                    times.append(s.elapsed_time(t))
                row[f"{name}_ms"] = round(statistics.median(times), 3)
            row["speedup"] = round(row["sdpa_ms"] / row["triton_ms"], 3)
            kv = kv_per_token * float(positions.sum() + b)
            if peak:
                row["hbm_bound_ms"] = round((weights + kv) / peak * 1e3, 3)
            out["steps"].append(row)
            print(json.dumps(row), flush=True)
    path = ROOT / "bench" / "results" / f"engine_check{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", path.relative_to(ROOT))


if __name__ == "__main__":
    main()
