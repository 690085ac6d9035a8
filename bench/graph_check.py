"""Does the CUDA-graphed training step (``train.cuda_graph``) compute what the eager step computes, and how fast?

    python bench/graph_check.py --model /tmp/llama7b [--steps 20] [--json bench/results/graph_check_<tag>.json]

Loads the model through ``orchestrator.backends`` as a Ray Train worker does with ``train.cuda_graph`` on
(Unsloth backend, 4-bit NF4 + double quant, LoRA r=16 on every linear layer, torch's checkpointing), gives the
LoRA weights seeded non-zero values, and builds packed micro-batches the way the data pipeline does
(``orchestrator.tokenization.pack``: rows of ``--max-len`` slots, position ids restarting
per example, prompt tokens unlabelled) from examples of 40-300 tokens; one batch of 16-32-token examples holds
more examples than the first graph's tables (a second, larger capture).

1. Same batch, eager vs replayed: the loss and every LoRA gradient (relative error and cosine similarity),
   the eager step recomputing whole layers (Unsloth's MLP and flash attention), the replay skipping the MLP's
   output and reusing flash attention's output when it recomputes a layer (``backends.skip_mlp_output_in_recompute``,
   ``backends.stash_attention_in_recompute``),
   for the first capture, a replay, a replay after an eager step of another batch, the second bucket, and two
   micro-batches accumulated with scale 1/2.
   Then three paged AdamW steps over the flat parameter buffers (``orchestrator.flat``) against bitsandbytes
   stepping each LoRA tensor from the same gradients.
2. Throughput: ``--steps`` optimizer steps (forward, backward, clip, paged AdamW step) eager, replayed with the
   per-tensor optimizer step, and replayed with the flat one, on the same batches; real tokens/s, step time,
   peak allocated memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def packed_batches(vocab: int, n: int, rows: int, max_len: int, seed: int, lengths=(40, 300)):
    """``n`` host micro-batches of ``rows`` packed rows, as the training loop receives them."""
    import numpy as np

    from orchestrator.data.pipelines import make_collate
    from orchestrator.data.tokenization import IGNORE, pack

    rng = random.Random(seed)
    collate = make_collate(0, True)
    out, pending = [], []
    while len(out) < n:
        while len(pending) < rows:
            examples = []
            for _ in range(rows * max_len // (sum(lengths) // 2) + 8):
                m = rng.randint(*lengths)
                ids = [rng.randrange(3, min(vocab, 8000)) for _ in range(m)]
                prompt = m // 3
                examples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
            pending += [r for r in pack(examples, max_len, 0) if r["num_tokens"] > max_len * 0.9]
        group, pending = pending[:rows], pending[rows:]
        out.append(collate({k: np.stack([r[k] for r in group]) if k != "num_tokens" else
                            np.array([r[k] for r in group]) for k in ("input_ids", "labels", "position_ids",
                                                                       "num_tokens")}))
    return out


def load_graphed_worker(model_path: str, rows: int, max_len: int):
    """The 7B model as a Ray Train worker loads it with ``train.cuda_graph`` on (Unsloth backend, 4-bit NF4 +
    double quant, LoRA r=16 on every linear layer): ``(cfg, backend, device, model, load_s)``."""
    import torch

    from bench.train_gpu import base_config
    from orchestrator.core.config import set_fields
    from orchestrator.training.backends import make_backend

    cfg = set_fields(base_config(model_path, "qa", "unused.jsonl", 15, "/tmp/unused"),
                     {"train.backend": "unsloth", "train.cuda_graph": True, "lora.dropout": 0.0,
                      "data.max_seq_length": max_len, "train.micro_batch_size": rows})
    backend = make_backend("unsloth")
    device = torch.device("cuda:0")
    t0 = time.perf_counter()
    model = backend.load(cfg, device, None)
    return cfg, backend, device, model, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--lengths", type=int, nargs=2, default=(40, 300), metavar=("MIN", "MAX"),
                    help="example lengths in tokens (the long mix: 1028 2052)")
    ap.add_argument("--json")
    ap.add_argument("--kernels", action="store_true", help="the device time of two graphed steps (optimizer "
                    "included) by kernel: printed, and in the JSON")
    args = ap.parse_args()

    import torch

    from bench.train_gpu import bench_commit
    from orchestrator.training.flat_params import FlatParameters
    from orchestrator.training.loop import make_optimizer
    from orchestrator.training.step_graph import GraphedStep

    cfg, backend, device, model, load_s = load_graphed_worker(args.model, args.rows, args.max_len)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    data = packed_batches(vocab, 16, args.rows, args.max_len, seed=1, lengths=tuple(args.lengths))
    short = packed_batches(vocab, 1, args.rows, args.max_len, seed=2, lengths=(16, 32))[0]
    flat = FlatParameters(params)
    graphed = GraphedStep(model, backend.graph_forward, device, args.rows, args.max_len, flat)

    # the reference recomputes whole layers with Unsloth's own functions
    from unsloth.kernels import fast_lora
    from unsloth.utils import attention_dispatch

    ours = fast_lora.LoRA_MLP, attention_dispatch._LeanFlashVarlen
    unsloths = tuple(c.__mro__[1] if getattr(c, "_skips_output_in_recompute", False) or getattr(c, "_stashes", False)
                     else c for c in ours)

    def eager(batch, scale=1.0):
        inputs = backend.to_device(batch, device)
        fast_lora.LoRA_MLP, attention_dispatch._LeanFlashVarlen = unsloths
        try:
            loss = backend.forward(model, {k: v for k, v in inputs.items() if k != "num_tokens"}).loss
            (loss * scale).backward()
        finally:
            fast_lora.LoRA_MLP, attention_dispatch._LeanFlashVarlen = ours
        return loss.detach()

    def take_grads():
        out = [p.grad.detach().float().clone() for p in params]
        flat.zero_grad()
        return out

    def compare(name, e_loss, e, g_loss, gr):
        rel = [((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(e, gr, strict=True)]
        cos = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
               for a, b in zip(e, gr, strict=True)]
        row = {"check": name, "loss_eager": e_loss.item(), "loss_graph": g_loss.item(),
               "loss_abs_diff": abs(e_loss.item() - g_loss.item()), "grad_rel_err_max": max(rel),
               "grad_rel_err_median": sorted(rel)[len(rel) // 2], "grad_cos_min": min(cos)}
        print(json.dumps(row), flush=True)
        return row

    checks = []
    for name, batch in [("first capture", data[0]), ("replay", data[1])]:
        e_loss = eager(batch)
        e = take_grads()
        g_loss = graphed.run(batch)
        checks.append(compare(name, e_loss, e, g_loss, take_grads()))
    eager(data[2])
    take_grads()
    e_loss = eager(data[3])
    e = take_grads()
    checks.append(compare("replay after an eager step", e_loss, e, graphed.run(data[3]), take_grads()))
    e_loss = eager(short)
    e = take_grads()
    checks.append(compare(f"second bucket ({int((short['position_ids'] == 0).sum())} segments)", e_loss, e,
                          graphed.run(short), take_grads()))
    e_loss = (eager(data[4], 0.5) + eager(data[5], 0.5)) / 2
    e = take_grads()
    g_loss = (graphed.run(data[4], 0.5) + graphed.run(data[5], 0.5)) / 2
    checks.append(compare("two micro-batches accumulated", e_loss, e, g_loss, take_grads()))

    # The flat optimizer step against bitsandbytes stepping each LoRA tensor, from the same gradients
    eager(data[6])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(ref, params, strict=True):
        r.grad = p.grad.detach().clone()
    ref_opt, optimizer = make_optimizer(cfg, ref), make_optimizer(cfg, params, flat)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        ref_opt.step()
        optimizer.step()
    diff = max((p - r).abs().max().item() for p, r in zip(params, ref, strict=True))
    moved = max((p - b).abs().max().item() for p, b in zip(params, before, strict=True))
    checks.append({"check": "flat optimizer step vs per-tensor (3 steps)", "max_abs_diff": diff, "max_abs_update": moved})
    print(json.dumps(checks[-1]), flush=True)
    del ref, ref_opt, before
    flat.zero_grad()
    tokens = [int(b["num_tokens"].sum()) for b in data]

    def opt_step(per_tensor: bool) -> None:
        if per_tensor:  # what the loop did before flat parameters: clip and step each LoRA tensor
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            per_tensor_opt.step()
        else:
            torch.nn.utils.clip_grad_norm_(flat.flats, 1.0)
            optimizer.step()
        flat.zero_grad()

    per_tensor_opt = make_optimizer(cfg, params)

    def timed(run_one, per_tensor: bool = False) -> dict:
        for i in range(3):
            run_one(data[i])
            opt_step(per_tensor)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        n_tok = 0
        for i in range(args.steps):
            run_one(data[i % len(data)])
            opt_step(per_tensor)
            n_tok += tokens[i % len(data)]
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return {"tokens_per_s": round(n_tok / dt, 1), "step_s": round(dt / args.steps, 4),
                "peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}

    for batch in data:  # every shape's graph captured before anything is timed
        graphed.run(batch)
        flat.zero_grad()
    kernels = None
    if args.kernels:  # where the device time of two graphed optimizer steps goes
        from torch.profiler import ProfilerActivity, profile

        for i in range(2):
            graphed.run(data[i])
            opt_step(False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(2):
                graphed.run(data[i])
                opt_step(False)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
        kernels = {"total_ms": round(sum(e.self_device_time_total for e in rows) / 2e3, 2),
                   "by_op_ms": {e.key[:100]: round(e.self_device_time_total / 2e3, 2) for e in rows[:30]
                                if e.self_device_time_total > 0}}
    results = {"eager": timed(eager), "graph_per_tensor_optimizer": timed(graphed.run, per_tensor=True),
               "graph": timed(graphed.run)}
    results["graph_vs_eager"] = round(results["graph"]["tokens_per_s"] / results["eager"]["tokens_per_s"], 3)
    results["flat_vs_per_tensor_optimizer"] = round(
        results["graph"]["tokens_per_s"] / results["graph_per_tensor_optimizer"]["tokens_per_s"], 3)
    print(json.dumps(results), flush=True)
    out = {"commit": bench_commit(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "host": platform.node(),
           "model": args.model, "rows": args.rows, "max_len": args.max_len, "steps": args.steps,
           "load_s": round(load_s, 1), "lengths": list(args.lengths), "captures": graphed.captures, "graphs": [list(k) for k in graphed.graphs],
           "checks": checks, "results": results, "kernels_per_graphed_step": kernels}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
