"""What a run cost: wall time by stage, GPU-hours (or CPU core-hours), tokens per GPU-hour, MFU where a GPU ran,
and dollars; for a Tune study, the trials summed and what early stopping saved.

Prices are on-demand list prices per GPU-hour as published by GPU clouds in 2025 (Lambda's for H100/A100,
typical neocloud prices for the rest); they are examples to compare runs with. Set ``cost.gpu_hour_usd`` to what
you pay. Peak FLOPs are the dense BF16 tensor-core figures of the vendors' data sheets.
"""

from __future__ import annotations

from typing import Any

from orchestrator.core.config import RunConfig

# name fragment (lower case, as torch.cuda.get_device_name reports it) -> (USD per GPU-hour, dense BF16 FLOP/s)
GPUS: dict[str, tuple[float, float]] = {
    "b200": (4.99, 2.25e15),
    "h200": (3.79, 989e12),
    "gh200": (3.19, 989e12),
    "h100 pcie": (2.49, 756e12),
    "h100": (2.99, 989e12),
    "a100-sxm4-80gb": (1.79, 312e12),
    "a100 80gb": (1.79, 312e12),
    "a100": (1.29, 312e12),
    "l40s": (1.25, 362e12),
    "l4": (0.80, 121e12),
    "a10g": (1.01, 70e12),
    "a10": (0.75, 125e12),
}
STAGES = ("data_prep_s", "setup_s", "data_wait_s", "train_s", "eval_s", "checkpoint_s", "scoring_s", "other_s")


def gpu_facts(device_name: str) -> tuple[float | None, float | None]:
    """(USD per GPU-hour, peak dense BF16 FLOP/s) of the GPU ``device_name`` names; None for one not listed."""
    name = device_name.lower()
    for frag, facts in sorted(GPUS.items(), key=lambda kv: -len(kv[0])):  # the most specific name first
        if frag in name:
            return facts
    return None, None


def run_cost(cfg: RunConfig, history: list[dict[str, Any]], wall: dict[str, float]) -> dict[str, Any]:
    """The cost section of a training run from its rank-0 step history and the driver's clock.

    ``wall``: the driver's seconds for ``data_prep_s`` (preparing and sharding the data), ``fit_s`` (Ray Train,
    workers started to stopped) and ``scoring_s`` (the before/after scoring task). A resumed run's history
    holds every attempt's steps; its fit time is this attempt's only."""
    s = cfg.scaling
    total = lambda key: sum(h.get(key, 0.0) for h in history)  # noqa: E731
    steps_s, evals = total("step_time_s"), [h.get("eval_s", 0.0) for h in history]
    # a step's window runs from the previous step's record: it holds that step's validation and checkpoint
    inside = sum(evals[:-1]) + total("checkpoint_s")
    fit = wall.get("fit_s", 0.0)
    stages = {"data_prep_s": wall.get("data_prep_s", 0.0), "setup_s": total("setup_s"),
              "data_wait_s": total("data_wait_s"),
              "train_s": max(0.0, steps_s - total("data_wait_s") - inside),
              "eval_s": sum(evals), "checkpoint_s": total("checkpoint_s"), "scoring_s": wall.get("scoring_s", 0.0)}
    stages["other_s"] = max(0.0, fit - stages["setup_s"] - steps_s - (evals[-1] if evals else 0.0))
    device = next((h["device_name"] for h in history if "device_name" in h), "cpu")
    flops = next((h["flops_per_token"] for h in history if "flops_per_token" in h), None)
    tokens = int(total("real_tokens"))
    out: dict[str, Any] = {"device": device, "wall_s": round(sum(stages.values()), 1),
                           "stages": {k: round(v, 2) for k, v in stages.items()}, "tokens": tokens}
    if s.use_gpu:
        gpus = s.num_workers * s.gpus_per_worker
        price, peak = gpu_facts(device)
        price = cfg.cost.gpu_hour_usd if cfg.cost.gpu_hour_usd is not None else price
        hours = (fit * gpus + stages["scoring_s"] * min(s.gpus_per_worker, 1)) / 3600
        out |= {"gpus": gpus, "gpu_hours": round(hours, 4), "usd_per_gpu_hour": price,
                "usd": round(hours * price, 4) if price is not None else None,
                "tokens_per_gpu_hour": round(tokens / (steps_s * gpus / 3600)) if steps_s and gpus else None,
                "mfu": (round(flops * tokens / (steps_s * gpus * peak), 4)
                        if flops and peak and steps_s and gpus else None)}
    else:
        cores = s.num_workers * s.cpus_per_worker
        hours = (fit * cores + stages["scoring_s"] * s.cpus_per_worker) / 3600
        out |= {"cpu_cores": cores, "cpu_core_hours": round(hours, 4),
                "usd_per_cpu_core_hour": cfg.cost.cpu_core_hour_usd, "usd": round(hours * cfg.cost.cpu_core_hour_usd, 4),
                "tokens_per_cpu_core_hour": round(tokens / (steps_s * cores / 3600)) if steps_s and cores else None}
    return out


def cost_lines(cost: dict[str, Any]) -> list[str]:
    """The cost section as Markdown table rows (``| what | figure |``)."""
    st = cost["stages"]
    names = {"data_prep_s": "data preparation (driver)", "setup_s": "workers' set-up (model load, strategy)",
             "data_wait_s": "waiting for data", "train_s": "training steps", "eval_s": "validation",
             "checkpoint_s": "checkpointing", "scoring_s": "before/after scoring",
             "other_s": "start, stop and the last save"}
    rows = [f"| wall time | {cost['wall_s'] / 60:.1f} min |"]
    rows += [f"| &nbsp;&nbsp;{names[k]} | {st.get(k, 0.0):.1f} s |" for k in STAGES if st.get(k)]
    if "gpu_hours" in cost:
        rows += [f"| GPUs | {cost['gpus']:g} x {cost['device']} |", f"| GPU-hours | {cost['gpu_hours']:.3f} |"]
        if cost.get("tokens_per_gpu_hour"):
            rows.append(f"| tokens per GPU-hour | {cost['tokens_per_gpu_hour']:,} |")
        rows.append(f"| MFU | {cost['mfu']:.1%} |" if cost.get("mfu") is not None else "| MFU | (GPU not listed) |")
        price = cost.get("usd_per_gpu_hour")
        rows.append(f"| cost | ${cost['usd']:.2f} at ${price:.2f}/GPU-hour |" if price is not None
                    else "| cost | set cost.gpu_hour_usd (GPU not listed) |")
    else:
        rows += [f"| CPU core-hours | {cost['cpu_core_hours']:.3f} ({cost['cpu_cores']:g} cores) |"]
        if cost.get("tokens_per_cpu_core_hour"):
            rows.append(f"| tokens per CPU core-hour | {cost['tokens_per_cpu_core_hour']:,} |")
        rows.append(f"| cost | ${cost['usd']:.4f} at ${cost['usd_per_cpu_core_hour']:.3f}/core-hour |")
    return rows


def study_cost(cfg: RunConfig, trials: list[dict[str, Any]], planned_steps: int) -> dict[str, Any]:
    """A study's trials summed (each trial's own cost where it wrote one, else its time on its resources) and
    what early stopping saved: a stopped trial's remaining steps at its own seconds per step."""
    s = cfg.scaling
    units = s.num_workers * (s.gpus_per_worker if s.use_gpu else s.cpus_per_worker)
    unit = "gpu_hours" if s.use_gpu else "cpu_core_hours"
    spent = saved = 0.0
    usd = saved_usd = 0.0
    for t in trials:
        c = t.get("cost") or {}
        hours = c.get(unit, t.get("time_s", 0.0) * units / 3600)
        rate = (c["usd"] / c[unit]) if c.get("usd") and c.get(unit) else (
            cfg.cost.gpu_hour_usd or 0.0 if s.use_gpu else cfg.cost.cpu_core_hour_usd)
        spent += hours
        usd += hours * rate
        done = t.get("step") or 0
        if t.get("status") == "stopped early" and done:
            left = max(0, planned_steps - done) * t.get("time_s", 0.0) / done * units / 3600
            saved, saved_usd = saved + left, saved_usd + left * rate
    return {"trials": len(trials), unit: round(spent, 4), "usd": round(usd, 4),
            f"saved_{unit}": round(saved, 4), "saved_usd": round(saved_usd, 4),
            "stopped_early": sum(t.get("status") == "stopped early" for t in trials)}
