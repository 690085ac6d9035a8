"""Reference decode throughput on one GPU: what plain transformers reaches for a 7B Llama-2-shaped model,
so a serving engine can be measured beside it in the same run.

    python bench/peer_decode.py [--batches 32 64] [--prompt 200] [--new 128] [--variants eager static]

Random bf16 weights (speed does not depend on their values), prompts of random token ids, greedy decoding,
every request decodes exactly --new tokens (no EOS). Variants:
  eager     generate() with the default dynamic cache, no compilation
  static    generate(cache_implementation="static"): transformers compiles the decode step itself
(wrapping model.forward in torch.compile(mode="reduce-overhead") by hand breaks generate's reuse of outputs.)
Each variant is warmed up once at each batch size, then timed. Prints and writes JSON (--out) with
new tokens/s, ms per decode step, and the bandwidth bound (weights + KV cache read once per step).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, cfg


def run(model, ids, new, **kw):
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t, out.shape[1] - ids.shape[1]


def prefill_s(model, ids):
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        model(ids, attention_mask=torch.ones_like(ids))
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--variants", nargs="+", choices=["eager", "static"], default=["eager", "static"])
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import transformers
    model, cfg = build("cuda")
    n_params = sum(p.numel() for p in model.parameters())
    props = torch.cuda.get_device_properties(0)
    res = {"device": props.name, "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "shape": "llama2-7b bf16", "params": n_params, "prompt_tokens": a.prompt, "new_tokens": a.new, "runs": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    for variant in a.variants:
        kw = {"cache_implementation": "static", "disable_compile": False} if variant == "static" else {}
        for b in a.batches:
            ids = torch.randint(3, cfg.vocab_size, (b, a.prompt), generator=g, device="cuda")
            try:
                t0 = time.perf_counter()
                run(model, ids, a.new, **kw)  # warm-up (compiles)
                warm = time.perf_counter() - t0
                s, n = run(model, ids, a.new, **kw)
                pf = prefill_s(model, ids) if variant == "eager" else None
                kv_bytes = 2 * cfg.num_hidden_layers * b * (a.prompt + a.new / 2) * cfg.hidden_size * 2
                bound_ms = (n_params * 2 + kv_bytes) / 3.35e12 * 1e3
                r = {"variant": variant, "batch": b, "s": round(s, 3), "new_tokens": n * b,
                     "new_tokens_per_s": round(n * b / s), "ms_per_step": round(s / n * 1e3, 2),
                     "bound_ms_per_step_h100_hbm": round(bound_ms, 2), "warmup_s": round(warm, 1)}
                if pf is not None:
                    r["prefill_s_whole_batch"] = round(pf, 3)
            except Exception as e:  # a variant that fails is reported, the rest still run
                r = {"variant": variant, "batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps(r), flush=True)
            res["runs"].append(r)
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
