"""Many LoRA adapters on one base at engine speed, against the merged single model in the same call.

    python bench/serve_multilora.py --model DIR [--config configs/constitution-qa.yaml] [--adapters 8] [--rank 16]
        [--plan 32:8 64:4] [--per-client 2] [--prompt-tokens 200] [--max-tokens 128] [--set FIELD=VALUE ...]
        [--client-procs N] [--tag T]

Writes ``--adapters`` random LoRA adapters (rank ``--rank`` on the seven projections, PEFT's file layout) for the
base in ``--model``, serves them with `orchestrator serve CONFIG --model DIR --adapter aI=DIR ...` (``run_serve``),
and for each ``CLIENTS:ADAPTERS`` of ``--plan`` drives streaming chat clients spread evenly over that many
adapters (in processes of 16 clients, bench/clients.py's ClientPool), then the same clients on the base itself (no
adapter rows: a merged model of the same shape). Writes bench/results/serve_multilora[_TAG].json with ``device``,
``adapters``, ``results`` and ``merged_tokens_per_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from record import write_result  # noqa: E402

PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapters(model_dir: str, out: Path, n: int, rank: int) -> dict[str, str]:
    """``n`` random rank-``rank`` adapters for the base in ``model_dir`` (its config.json gives the shapes)."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    d = cfg.get("head_dim") or hidden // heads
    shapes = {"q_proj": (hidden, heads * d), "k_proj": (hidden, kv * d), "v_proj": (hidden, kv * d),
              "o_proj": (heads * d, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    paths = {}
    for a in range(n):
        g = torch.Generator().manual_seed(a)
        state = {}
        for layer in range(cfg["num_hidden_layers"]):
            for part, (fan_in, fan_out) in shapes.items():
                sub = "self_attn" if part.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                key = f"base_model.model.model.layers.{layer}.{sub}.{part}"
                state[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5).bfloat16()
                state[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.01).bfloat16()
        folder = out / f"a{a}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": list(PARTS), "base_model_name_or_path": model_dir, "lora_dropout": 0.0}))
        paths[f"a{a}"] = str(folder)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", default="configs/constitution-qa.yaml")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--plan", nargs="+", default=["32:8", "64:4"])
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--client-procs", type=int, default=None, help="processes the clients are spread over (unset: "
                    "one per 16 clients; 0: all in this process over a new connection pool per pass, as before)")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    import ray
    from clients import level, use_tokenizer
    from ray import serve
    from serve_user_path import _commit, device_name, stats

    from orchestrator.deployment.launcher import run_serve

    t0 = time.perf_counter()
    paths = write_adapters(a.model, Path(os.environ.get("ADAPTER_DIR", "/tmp/bench-adapters")), a.adapters, a.rank)
    use_tokenizer(a.model)
    res = {"device": device_name(), "adapters": a.adapters, "rank": a.rank, "config": a.config,
           "overrides": a.overrides, "commit": os.environ.get("BENCH_COMMIT") or _commit(),
           "adapters_written_s": round(time.perf_counter() - t0, 1), "results": [], "merged_tokens_per_s": {}}
    url = run_serve([ROOT / a.config], a.overrides, [a.model], blocking=False,
                    adapters=[f"{n}={p}" for n, p in paths.items()])
    for item in a.plan:
        clients, n = map(int, item.split(":"))
        names = [f"a{i}" for i in range(n)]
        r = level(url, clients, a.per_client, a.max_tokens, a.prompt_tokens, seed=clients, models=names,
                  procs=a.client_procs)
        r["adapters_used"] = n
        base = level(url, clients, a.per_client, a.max_tokens, a.prompt_tokens, seed=clients + 7, procs=a.client_procs)
        res["merged_tokens_per_s"][str(clients)] = base["tokens_per_s"]
        r["vs_merged"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3) if base["tokens_per_s"] else None
        r["merged"] = base
        res["results"].append(r)
        print(json.dumps({k: r[k] for k in ("concurrency", "adapters_used", "tokens_per_s", "ttft_p99_s", "errors",
                                            "vs_merged")}), flush=True)
        write_result("serve_multilora", a.tag, res)
    res["engine"] = stats(url)
    serve.shutdown()
    ray.shutdown()
    write_result("serve_multilora", a.tag, res)


if __name__ == "__main__":
    main()
