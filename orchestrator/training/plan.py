"""`orchestrator plan CONFIG`: what a run will cost before it runs.

Prepares the data (the tokens after packing, the optimizer steps), then times a short probe on the configured
hardware: a few real training steps with one validation and one checkpoint, in a scratch folder that is removed
afterwards (``--tokens-per-s`` instead takes a stated throughput of one worker on that GPU, and times nothing). The estimate is
set-up + steps x seconds per step + validations x (validation + checkpoint), priced like a finished run's cost
section; with ``--deadline`` it names the fewest workers that finish in time (steps shrink with the workers;
seconds per step held, as DDP keeps them within a few percent).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.core.config import ConfigError, RunConfig, load_config, set_fields
from orchestrator.core.io import atomic_write_text
from orchestrator.reports.cost import gpu_facts
from orchestrator.reports.tables import text_table
from orchestrator.training.loop import Plan

WORKER_STEPS = (1, 2, 4, 8, 16, 32, 64, 128)  # multiples of the configured workers tried for a deadline


def probe(cfg: RunConfig, prepared, steps: int) -> dict[str, Any]:
    """Seconds per optimizer step, per validation and per checkpoint, and the workers' set-up, from ``steps``
    (at least 5) real steps of the run in a scratch folder (removed after): validations after step ``steps - 2``
    and the last, so steps 2.. before the first are plain ones and the window after it times a validation."""
    from orchestrator.training.train import run_training

    scratch = Path(tempfile.mkdtemp(prefix=f"{cfg.name}-plan-"))
    try:
        pcfg = set_fields(cfg, {"output_dir": str(scratch), "name": "probe", "train.max_steps": steps,
                                "train.eval_every": steps - 2, "train.score_examples": 0, "train.profile_steps": None,
                                "tracking.backends": []})
        hist = run_training(pcfg, prepared=prepared).history
        cost = json.loads((scratch / "probe" / "metrics.json").read_text())["cost"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    plain = plain_steps(hist)
    step_s = statistics.median(h["step_time_s"] for h in plain)
    saves = [h["checkpoint_s"] for h in hist if "checkpoint_s" in h]
    save_s = statistics.mean(saves) if saves else 0.0
    # a validation costs what the window after it holds beyond a step: the validation itself, the checkpoint
    # and its report to Ray Train
    after = [h["step_time_s"] - step_s for i, h in enumerate(hist) if i > 0 and "eval_s" in hist[i - 1]]
    evals = [h["eval_s"] for h in hist if "eval_s" in h]
    eval_s = max(statistics.mean(after) - save_s if after else 0.0, statistics.mean(evals) if evals else 0.0)
    st = cost["stages"]
    return {"steps": len(hist), "step_s": step_s,
            "tokens_per_s": sum(h["real_tokens"] for h in plain) / max(sum(h["step_time_s"] for h in plain), 1e-9),
            "setup_s": st["setup_s"] + st["other_s"], "eval_s": eval_s, "checkpoint_s": save_s,
            "device": cost["device"]}


def plain_steps(hist: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps whose window is one optimizer step alone: not the first (set-up), not a validation step (the
    recorder closes its window right after the step before it, so it reads ~0 s) and not the step after one (its
    window holds the validation and the checkpoint)."""
    plain = [h for i, h in enumerate(hist) if i > 0 and "eval_s" not in h and "eval_s" not in hist[i - 1]]
    return plain or hist[1:] or hist


def estimate(cfg: RunConfig, train_rows: int, tokens_per_row: float, timing: dict[str, Any], workers: int
             ) -> dict[str, Any]:
    """Steps and wall time of the run on ``workers`` workers at the probe's (or stated) timing."""
    steps = Plan.make(cfg, train_rows // workers).total_steps
    evals = math.ceil(steps / cfg.train.eval_every)
    wall = timing.get("data_prep_s", 0.0) + timing["setup_s"] + steps * timing["step_s"] + evals * (timing["eval_s"] + timing["checkpoint_s"])
    s = cfg.scaling
    units = workers * (s.gpus_per_worker if s.use_gpu else s.cpus_per_worker)
    price = cfg.cost.gpu_hour_usd if s.use_gpu and cfg.cost.gpu_hour_usd is not None else (
        gpu_facts(timing["device"])[0] if s.use_gpu else cfg.cost.cpu_core_hour_usd)
    hours = wall * units / 3600
    return {"workers": workers, "units": units, "steps": steps, "tokens": round(steps * tokens_per_row *
            cfg.train.micro_batch_size * cfg.train.grad_accum * workers), "wall_s": wall, "hours": hours,
            "usd": hours * price if price is not None else None}


def run_plan(config: str | Path, overrides: list[str] | None = None, deadline_h: float | None = None,
             tokens_per_s: float | None = None, probe_steps: int = 6, gpu: str | None = None) -> dict[str, Any]:
    """Entry for `orchestrator plan`: print the plan table and write it to ``output_dir/NAME-plan/plan.json``."""
    from orchestrator.core.runtime import init_ray
    from orchestrator.data.base import ensure_model
    from orchestrator.data.pipelines import split_stats
    from orchestrator.data.prepare import prepare_data

    cfg = load_config(config, overrides)
    out = Path(cfg.output_dir) / f"{cfg.name}-plan"
    ensure_model(cfg)
    init_ray(log_file=out / "ray.log")
    t0 = time.perf_counter()
    prepared = prepare_data(cfg)
    stats = split_stats(cfg, prepared.datasets["train"].materialize())
    prep_s = time.perf_counter() - t0
    if not stats["rows"]:
        raise ConfigError(f"{cfg.name}: no training rows to plan for")
    tokens_per_row = stats["tokens"] / stats["rows"]
    n0 = cfg.scaling.num_workers
    if tokens_per_s:  # a stated throughput: no probe, no set-up or validation time known
        per_worker_step = tokens_per_row * cfg.train.micro_batch_size * cfg.train.grad_accum
        timing = {"step_s": per_worker_step / tokens_per_s, "tokens_per_s": tokens_per_s, "setup_s": 0.0, "eval_s": 0.0,
                  "checkpoint_s": 0.0, "device": gpu or ("gpu" if cfg.scaling.use_gpu else "cpu"), "steps": 0}
    else:
        from orchestrator.training.train import check_cluster_fits

        check_cluster_fits(cfg)
        timing = probe(cfg, prepared, probe_steps)
    timing["data_prep_s"] = prep_s
    rows = []
    for k in WORKER_STEPS:  # more workers while they still cut the steps
        row = estimate(cfg, stats["rows"], tokens_per_row, timing, n0 * k)
        if rows and row["steps"] >= rows[-1]["steps"]:
            break
        rows.append(row)
    chosen = rows[0]
    if deadline_h:
        chosen = next((r for r in rows if r["wall_s"] <= deadline_h * 3600), None)
    plan = {"config": str(config), "train_rows": stats["rows"], "train_tokens": stats["tokens"],
            "examples": stats["examples"], "timing": timing, "as_configured": rows[0], "deadline_h": deadline_h,
            "meets_deadline": chosen, "by_workers": rows}
    atomic_write_text(out / "plan.json", json.dumps(plan, indent=2))
    print(format_plan(cfg, plan))
    return plan


def format_plan(cfg: RunConfig, plan: dict[str, Any]) -> str:
    t = plan["timing"]
    unit = "GPU" if cfg.scaling.use_gpu else "CPU core"
    source = (f"measured: {t['steps']} probe steps on {t['device']}" if t["steps"]
              else f"stated: {t['tokens_per_s']:,.0f} tokens/s, set-up and validation not included")
    money = lambda x: f"${x:,.2f}" if x is not None else "set cost.gpu_hour_usd"  # noqa: E731
    lines = [f"{cfg.name}: {plan['examples']:,} examples -> {plan['train_rows']:,} training rows, "
             f"{plan['train_tokens']:,} tokens per epoch (after packing)",
             f"seconds per step {t['step_s']:.3f} ({t['tokens_per_s']:,.0f} tokens/s; {source})",
             text_table([["workers", f"{unit}s", "steps", "tokens", "wall", f"{unit}-hours", "cost"]]
                        + [[str(x["workers"]), f"{x['units']:g}", f"{x['steps']:,}", f"{x['tokens']:,}",
                            _hours(x["wall_s"]), f"{x['hours']:.3f}", money(x["usd"])] for x in plan["by_workers"]],
                        rule=True)]
    if plan["deadline_h"]:
        c = plan["meets_deadline"]
        lines.append(f"deadline {plan['deadline_h']:g} h: " + (
            f"{c['workers']} workers ({c['units']:g} {unit}s), about {_hours(c['wall_s'])}, {money(c['usd'])}"
            if c else f"not met with up to {plan['by_workers'][-1]['workers']} workers"))
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
