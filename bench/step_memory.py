"""Where a training step's peak GPU memory goes: resident state, the eager step, the CUDA-graphed step.

    python bench/step_memory.py --model /tmp/llama7b [--rows 4 --max-len 512] [--json bench/results/step_memory_<tag>.json]

Loads the model as a Ray Train worker does with ``train.cuda_graph`` on (Unsloth backend, as
``bench/graph_check.py``), creates the flat parameters and the optimizer, and reports in MB:

- ``resident``: allocated before any step (4-bit weights, head and embeddings, LoRA weights and gradients);
- per step kind (``eager``: the backend's eager forward and backward, Unsloth's functions recomputing whole
  layers; ``graph``: a first capture, then replays of other batches): the peak allocated during the step and
  the peak above ``resident``;
- for the second eager step and the graphed step, the allocations alive at the peak, grouped by the code that
  made them (the innermost frame outside torch, and the project's frame that called it), largest first, and
  the largest of them with their stacks.

A replay allocates nothing (its memory is the graph pool's, reserved at capture), so the graphed step's peak is
the capture's: what trainers report as peak allocated memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MB = 2**20


def site(frames: list[dict]) -> str:
    """``innermost non-torch frame (project frame that led there)`` of an allocation's Python stack."""
    outside = [f for f in frames if "/torch/" not in f["filename"] and f["filename"] != "??"]
    if not outside:
        return "torch"

    def short(f: dict) -> str:
        parts = Path(f["filename"]).parts
        return f"{'/'.join(parts[-2:])}:{f['line']} {f['name']}"

    ours = next((f for f in outside if "orchestrator" in f["filename"]), None)
    return short(outside[0]) + (f" (via {short(ours)})" if ours and ours is not outside[0] else "")


def live_at_peak(snapshot: dict, device: int = 0, top: int = 15) -> dict:
    """Replay the allocator's trace: the largest total of live allocations, and those live then by site."""
    events = snapshot["device_traces"][device]
    live: dict[int, tuple[int, int]] = {}
    total = peak = peak_at = 0
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], i)
            total += e["size"]
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
        if total > peak:
            peak, peak_at = total, i
    alive: dict[int, tuple[int, int, dict]] = {}  # the same replay, stopped at the peak
    for i, e in enumerate(events[:peak_at + 1]):
        if e["action"] == "alloc":
            alive[e["addr"]] = (e["size"], i, e)
        elif e["action"] in ("free_requested", "free_completed"):
            alive.pop(e["addr"], None)
    by_site: dict[str, int] = defaultdict(int)
    for size, _, e in alive.values():
        by_site[site(e.get("frames", []))] += size
    rows = sorted(by_site.items(), key=lambda kv: -kv[1])
    largest = sorted(alive.values(), key=lambda se: -se[0])[:top]
    return {"traced_peak_mb": round(peak / MB, 1), "events": len(events), "peak_event": peak_at,
            "by_site_mb": {k: round(v / MB, 1) for k, v in rows[:top]},
            "other_sites_mb": round(sum(v for _, v in rows[top:]) / MB, 1),
            "at_peak_allocating": stack(events[peak_at].get("frames", [])),
            "largest_live": [{"mb": round(size / MB, 1), "event": i, "stack": stack(e.get("frames", []))}
                             for size, i, e in largest]}


def stack(frames: list[dict], depth: int = 6) -> list[str]:
    """The innermost ``depth`` frames outside torch, innermost first."""
    return [f"{'/'.join(Path(f['filename']).parts[-2:])}:{f['line']} {f['name']}" for f in frames
            if "/torch/" not in f["filename"] and f["filename"] != "??"][:depth]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--lengths", type=int, nargs=2, default=(40, 300), metavar=("MIN", "MAX"))
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from bench.graph_check import load_graphed_worker, packed_batches
    from bench.train_gpu import bench_commit
    from orchestrator.training.flat_params import FlatParameters
    from orchestrator.training.loop import make_optimizer
    from orchestrator.training.step_graph import GraphedStep

    cfg, backend, device, model, load_s = load_graphed_worker(args.model, args.rows, args.max_len)
    params = [p for p in model.parameters() if p.requires_grad]
    flat = FlatParameters(params)
    make_optimizer(cfg, params, flat)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    data = packed_batches(vocab, 4, args.rows, args.max_len, seed=1, lengths=tuple(args.lengths))
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()

    def measure(run) -> dict:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        flat.zero_grad()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_allocated_mb": round(peak / MB, 1), "above_resident_mb": round((peak - resident) / MB, 1)}

    def eager(batch) -> None:
        inputs = backend.to_device(batch, device)
        backend.forward(model, {k: v for k, v in inputs.items() if k != "num_tokens"}).loss.backward()

    graphed = GraphedStep(model, backend.graph_forward, device, args.rows, args.max_len, flat)
    out = {"eager": measure(lambda: eager(data[0]))}

    def traced(run) -> dict:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        row = measure(run)
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        return {**row, "allocated_before_mb": round(before / MB, 1), **live_at_peak(snapshot)}

    before = torch.cuda.memory_allocated()
    out["eager_again"] = traced(lambda: eager(data[1]))
    before = torch.cuda.memory_allocated()
    out["graph"] = traced(lambda: [graphed.run(b) for b in data])
    out["graph_replays_only"] = measure(lambda: [graphed.run(b) for b in data])
    res = {"commit": bench_commit(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "model": args.model, "rows": args.rows, "max_len": args.max_len, "lengths": list(args.lengths),
           "load_s": round(load_s, 1), "captures": graphed.captures, "resident_mb": round(resident / MB, 1),
           "reserved_mb": round(torch.cuda.max_memory_reserved() / MB, 1), **out}
    print(json.dumps(res, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
