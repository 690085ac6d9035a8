"""Quality and time of the CPU tiny configs (issue targets: NER entity F1 >= 0.85 on BC5CDR test;
constitution QA training loss falls by >= 50% and the model reproduces trained answers).

    python bench/train_tiny.py ner|qa [--set FIELD=VALUE ...] [--tag TAG]

Trains with the shipped tiny config (2 Ray Train CPU workers; ``--set scaling.use_gpu=true`` for GPU
workers), evaluates, and writes bench/results/train_<config>[-TAG].json with the command, config, device,
timings and metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def device_name(use_gpu: bool, workers: int) -> str:
    """What the run trained on: the GPU's name for GPU workers, else the host's CPU."""
    host = f"{platform.machine()}, {os.cpu_count()} cores"
    if use_gpu:
        import torch

        return f"{torch.cuda.get_device_name(0)} ({workers} Ray Train GPU worker(s)), host {host}"
    return f"{host}, CPU only"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["ner", "qa"])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--tag", default="", help="suffix of the result file: train_<config>-<tag>.json")
    args = ap.parse_args()
    os.chdir(ROOT)

    from orchestrator.artifacts.evaluate import evaluate_ner, evaluate_qa
    from orchestrator.core.config import load_config
    from orchestrator.core.runtime import init_ray
    from orchestrator.training.train import run_training

    name = "medical-ner-tiny" if args.which == "ner" else "constitution-qa-tiny"
    overrides = [f"name={name}-bench", "output_dir=runs/bench", *args.overrides]
    cfg = load_config(ROOT / f"configs/{name}.yaml", overrides)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    init_ray()
    t0 = time.perf_counter()
    from orchestrator.data.prepare import prepare_data

    prepared = prepare_data(cfg)
    t_prep = time.perf_counter() - t0
    res = run_training(cfg, prepared=prepared)
    t_train = time.perf_counter() - t0 - t_prep
    t1 = time.perf_counter()
    if args.which == "ner":
        test = prepared.raw.get("test") or prepared.raw["validation"]
        test = test[: args.eval_limit] if args.eval_limit else test
        ev = evaluate_ner(cfg, res.adapter_dir, test, prepared.labels)
    else:
        # "Reproduces trained answers": greedy answers to training questions vs. their references.
        train_pairs = prepared.raw["train"][: args.eval_limit or 64]
        ev = {"train_questions": evaluate_qa(cfg, res.adapter_dir, train_pairs),
              "test_questions": evaluate_qa(cfg, res.adapter_dir, prepared.raw["test"][: args.eval_limit or 64])}
    t_eval = time.perf_counter() - t1
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    out = {
        "command": "python bench/train_tiny.py " + " ".join(sys.argv[1:]),
        "device": device_name(cfg.scaling.use_gpu, cfg.scaling.num_workers),
        "commit": os.environ.get("BENCH_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
        "seconds": {"prepare": round(t_prep, 1), "train": round(t_train, 1), "eval": round(t_eval, 1)},
        "steps": res.history[-1]["step"], "first_loss": first, "final_loss": last,
        "loss_drop": 1 - last / first, "final_validation": {k: v for k, v in res.history[-1].items()
                                                             if k.startswith(("val", "entity", "token", "perp"))},
        "eval": ev,
    }
    path = ROOT / f"bench/results/train_{name}{'-' + args.tag if args.tag else ''}.json"
    # Record paths relative to the checkout, so results do not depend on where it lives.
    path.write_text(json.dumps(out, indent=2).replace(f"{ROOT}/", "") + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "config"}, indent=2)[:4000])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
