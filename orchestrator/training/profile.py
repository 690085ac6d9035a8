"""`train.profile_steps: [FIRST, LAST]`: torch.profiler over a few optimizer steps of rank 0.

Writes RUN_DIR/profile/trace.json (Chrome trace, open in Perfetto) and summary.json: the device's busy fraction
over the profiled steps (union of kernel intervals over their wall time), the longest idle gaps with the host
operation that was running when each began, the operations that took the most host time, and the kernels that
took the most device time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class StepProfiler:
    """Start before step ``first`` begins, stop after step ``last`` ends (1-based optimizer steps)."""

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, active: bool):
        self.first, self.last = steps or (0, -1)
        self.out_dir = out_dir
        self.active = active and steps is not None
        self.prof = None
        self.mark = None

    def step_begins(self, step: int) -> None:
        if not self.active:
            return
        import torch

        if step == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=False, with_stack=False)
            self.prof.__enter__()
        if self.prof is not None:
            self.mark = torch.profiler.record_function(f"optimizer_step_{step}")
            self.mark.__enter__()

    def step_ends(self, step: int) -> None:
        if self.prof is None:
            return
        self.mark.__exit__(None, None, None)
        if step == self.last:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            trace = self.out_dir / "trace.json"
            self.prof.export_chrome_trace(str(trace))
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            (self.out_dir / "ops.txt").write_text(table)
            summary = summarize_trace(json.loads(trace.read_text()))
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print("profile: " + json.dumps({k: summary[k] for k in ("steps", "wall_ms", "device_busy_fraction")}))
            self.prof = None
            self.active = False


def summarize_trace(trace: dict[str, Any], top: int = 12) -> dict[str, Any]:
    """Device busy fraction over the marked steps, the longest idle gaps, the costliest host operations and the
    costliest kernels (device time summed by name)."""
    events = trace.get("traceEvents", [])
    steps = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("optimizer_step_")
             and e.get("cat") == "user_annotation"]
    if not steps:
        return {"steps": 0, "wall_ms": 0.0, "device_busy_fraction": None}
    t0 = min(e["ts"] for e in steps)
    t1 = max(e["ts"] + e["dur"] for e in steps)
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
              and t0 <= e["ts"] <= t1]
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in device)
    by_kernel: dict[str, float] = {}
    for e in device:
        name = str(e.get("name", ""))[:120]
        by_kernel[name] = by_kernel.get(name, 0.0) + e["dur"]
    busy, gaps, end = 0.0, [], t0
    for s, f in kernels:
        if s > end:
            gaps.append((s - end, end))
        if f > end:
            busy += f - max(s, end)
            end = f
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op" and t0 <= e["ts"] <= t1]

    def running_at(t: float) -> str:
        live = [e for e in host if e["ts"] <= t <= e["ts"] + e["dur"]]
        return min(live, key=lambda e: e["dur"])["name"] if live else "(no host op)"

    by_name: dict[str, float] = {}
    for e in host:
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + e["dur"]
    return {
        "steps": len(steps), "wall_ms": round((t1 - t0) / 1e3, 2),
        "device_busy_fraction": round(busy / (t1 - t0), 4) if kernels else None,
        "idle_ms": round((t1 - t0 - busy) / 1e3, 2),
        "longest_gaps": [{"ms": round(g / 1e3, 3), "host_op": running_at(at)}
                         for g, at in sorted(gaps, reverse=True)[:top]],
        "host_ops_inclusive_ms": {k: round(v / 1e3, 2) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]},
        "kernel_ms_total": round(sum(by_kernel.values()) / 1e3, 2),
        "kernels_ms": {k: round(v / 1e3, 2) for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:2 * top]},
    }
