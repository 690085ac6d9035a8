"""Device time of a captured CUDA graph, as the bench scripts time kernels without the host's launch cost."""

from __future__ import annotations

import torch


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Milliseconds per replay of ``graph``: one replay first, then ``reps`` replays timed by CUDA events."""
    graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps
