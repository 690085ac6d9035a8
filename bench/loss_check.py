"""The CUDA-graphed step's loss on a GPU: the Triton kernel against the PyTorch chunk it replaced.

    python bench/loss_check.py [--tag TAG]

Per vocabulary (Llama 2's 32,000, Llama 3's 128,256, Qwen 3's 151,936; hidden size 4,096, a frozen bf16 head as
in a LoRA run, 512 tokens per chunk as the step runs it) and micro-batch (4 or 8 rows of 512 tokens, about 60%
labelled), the loss's forward and backward captured in a CUDA graph: milliseconds per replay, the peak memory it
adds above its inputs, and the Triton variant's loss and gradient against PyTorch's. Writes
bench/results/loss_check[_TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.training import kernels  # noqa: E402
from orchestrator.training.backends import LOSS_CHUNK  # noqa: E402
from orchestrator.training.step_graph import ChunkedCrossEntropy  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))

from record import write_result  # noqa: E402
from timing import replay_ms  # noqa: E402


def run(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, reps: int = 10) -> dict:
    """Forward and backward of the loss in one CUDA graph: ms per replay, peak MB above the inputs, outputs."""

    def step():
        h = hidden.detach().requires_grad_()
        loss = ChunkedCrossEntropy.apply(h, head, labels, LOSS_CHUNK)
        (grad,) = torch.autograd.grad(loss, h)
        return loss, grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up (Triton compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss, grad = step()
    g.replay()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    out = {"ms": round(replay_ms(g, reps), 3), "peak_mb": round(peak / 2**20, 1),
           "loss": loss.item(), "grad": grad.float().clone()}
    del g
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("BENCH_COMMIT"), "chunk": LOSS_CHUNK,
           "cases": {}}
    for vocab in (32000, 128256, 151936):
        head = (torch.randn(vocab, 4096, device="cuda") * 0.02).to(torch.bfloat16)
        for rows in (4, 8):
            tokens = rows * 512
            hidden = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
            labels = torch.randint(0, vocab, (tokens,), device="cuda")
            labels[torch.rand(tokens, device="cuda") < 0.4] = -100
            with mock.patch.object(kernels, "available", lambda device: False):
                ref = run(hidden, head, labels)
            new = run(hidden, head, labels)
            diff = (new.pop("grad") - ref.pop("grad")).abs().max().item()
            key = f"vocab {vocab}, {rows} x 512"
            res["cases"][key] = {"pytorch": ref, "triton": new, "speedup": round(ref["ms"] / new["ms"], 3),
                                 "peak_mb_saved": round(ref["peak_mb"] - new["peak_mb"], 1),
                                 "loss_diff": abs(new["loss"] - ref["loss"]), "grad_max_abs_diff": diff}
            print(json.dumps({key: res["cases"][key]}), flush=True)
        del head
    write_result("loss_check", a.tag, res)


if __name__ == "__main__":
    main()
