"""How close `orchestrator plan` comes: its estimate for a STEPS-step run against that run, measured, in one call.

    python bench/plan_check.py CONFIG [--steps 200] [--probe-steps 6] [--set FIELD=VALUE ...] [--tag TAG]

Plans the config with ``train.max_steps=STEPS`` (data prepared, a probe of real steps timed), then trains it
for those steps in a fresh folder (before/after scoring off: the plan does not estimate it) and compares the
estimated wall time with the driver's measured one (data preparation through the last checkpoint). Writes
bench/results/plan_check[-TAG].json with the command, config, commit, device and both figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--probe-steps", type=int, default=6)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from orchestrator.core.config import load_config
    from orchestrator.core.tracking import git_commit
    from orchestrator.data.prepare import prepare_data
    from orchestrator.training.plan import run_plan
    from orchestrator.training.train import run_training

    out = Path(tempfile.mkdtemp(prefix="plan-check-"))
    sets = [*args.overrides, f"train.max_steps={args.steps}", "train.score_examples=0", f"output_dir={out}"]
    plan = run_plan(args.config, sets, probe_steps=args.probe_steps)
    cfg = load_config(args.config, sets)
    t0 = time.perf_counter()
    res = run_training(cfg, prepared=prepare_data(cfg))
    measured = time.perf_counter() - t0
    est = plan["as_configured"]
    result = {
        "command": " ".join(["python", *sys.argv]), "commit": git_commit(), "config": args.config,
        "overrides": args.overrides, "steps": args.steps, "probe": plan["timing"],
        "device": plan["timing"]["device"], "estimated_wall_s": round(est["wall_s"], 1),
        "measured_wall_s": round(measured, 1), "ratio": round(est["wall_s"] / measured, 3),
        "measured_steps": len(res.history),
        "measured_cost": json.loads((res.run_dir / "metrics.json").read_text())["cost"],
    }
    dest = ROOT / "bench/results" / f"plan_check{'-' + args.tag if args.tag else ''}.json"
    dest.write_text(json.dumps(result, indent=2))
    print(f"estimated {result['estimated_wall_s']:.0f} s, measured {result['measured_wall_s']:.0f} s "
          f"(ratio {result['ratio']:.3f}) -> {dest}")


if __name__ == "__main__":
    main()
