"""Fault injection with figures: a training or study driver killed mid-run, then `--resume` (RELIABILITY.md).

    python bench/faults.py driver-kill --repeats 3 [--kill-after-step 5] [--out bench/results/faults_driver_kill.json]
    python bench/faults.py study-kill --repeats 2 [--out bench/results/faults_study_kill.json]

study-kill: `orchestrator tune` (2 grid trials of 6 steps, one at a time, no early stopping) is killed the
same way once its first trial's step 3 shows in ray.log, then `orchestrator tune ... --resume` continues the
study; recorded: whether it finished with both trials complete, the interrupted trial's steps (each once),
its final loss against the same trial in an uninterrupted study, and wall times.

Per repeat, on the tiny QA config (12 steps, a checkpoint every 2): `orchestrator train` runs as its own
process group; once the rank-0 worker's line for step K reaches the run's ray.log the whole group (driver,
its local Ray, the workers) gets SIGKILL, as an OOM kill or a lost login node would; then
`orchestrator train ... --resume RUN_DIR` continues. A clean run of the same config is the reference.
Recorded: the step the resume started from (the last checkpoint), the steps recomputed, the history's steps
(each step once, 1..12: nothing lost, nothing doubled), the final adapter's and loss's agreement with the
clean run, and wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETS = {"model.tiny_pretrain_steps": 10, "data.qa.max_articles": 12, "data.max_seq_length": 128,
        "data.tokenize_actors": 1, "train.max_steps": 12, "train.eval_every": 2, "train.log_every": 1,
        "train.keep_checkpoints": 2}


def train(out: Path, model: Path, resume: bool = False, kill_after: int | None = None) -> dict:
    argv = [str(Path(sys.executable).parent / "orchestrator"), "train", str(ROOT / "configs/constitution-qa-tiny.yaml")]
    for k, v in {**SETS, "output_dir": out, "model.name_or_path": model}.items():  # one tiny base for all runs
        argv += ["--set", f"{k}={v}"]
    if resume:
        argv += ["--resume", str(out / "constitution-qa-tiny")]
    return _run(argv, out, kill_after)


def _run(argv: list[str], out: Path, kill_after: int | None) -> dict:
    """Run a CLI command in its own process group; with ``kill_after``, SIGKILL the group once the rank-0
    worker's line for that step shows in the run's ray.log."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if kill_after is None:
        text, _ = proc.communicate(timeout=1200)
        return {"rc": proc.returncode, "wall_s": round(time.time() - t0, 1), "console": text[-3000:]}
    log = out / "constitution-qa-tiny" / "ray.log"
    pattern = re.compile(r'\{"step": (\d+),')
    seen = 0
    while proc.poll() is None and seen < kill_after:
        if log.exists():
            steps = [int(m) for m in pattern.findall(log.read_text(errors="replace"))]
            seen = max(steps, default=0)
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    return {"killed_after_step": seen, "wall_s": round(time.time() - t0, 1)}


STUDY_SETS = {**SETS, "train.max_steps": 6, "tune.num_samples": 1, "tune.max_concurrent_trials": 1,
              "tune.scheduler": "none", "tune.search_space": '{"train.lr": {"type": "grid", "values": [0.003, 0.001]}}'}


def tune(out: Path, model: Path, resume: bool = False, kill_after: int | None = None) -> dict:
    argv = [str(Path(sys.executable).parent / "orchestrator"), "tune", str(ROOT / "configs/constitution-qa-tiny.yaml")]
    for k, v in {**STUDY_SETS, "output_dir": out, "model.name_or_path": model}.items():
        argv += ["--set", f"{k}={v}"]
    if resume:
        argv += ["--resume"]
    return _run(argv, out, kill_after)


def trials(out: Path) -> list[dict]:
    return json.loads((out / "constitution-qa-tiny" / "trials.json").read_text())


def study_kill(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    model = work / "models/tiny-llama"
    clean = tune(work / "clean", model)
    assert clean["rc"] == 0, clean["console"]
    ref = {t["train.lr"]: t for t in trials(work / "clean")}
    repeats = []
    for i in range(args.repeats):
        out = work / f"r{i}"
        killed = tune(out, model, kill_after=3)
        resumed = tune(out, model, resume=True)
        rec = {**killed, "resume_rc": resumed["rc"], "resume_wall_s": resumed["wall_s"]}
        if resumed["rc"] == 0:
            got = trials(out)
            rec.update(trials=[{k: t.get(k) for k in ("train.lr", "status", "step", "last_val_loss")} for t in got],
                       all_complete=len(got) == 2 and all(t["status"] == "completed" for t in got),
                       last_val_loss_diff_vs_clean=max(abs(t["last_val_loss"] - ref[t["train.lr"]]["last_val_loss"])
                                                       for t in got))
        else:
            rec["resume_console"] = resumed["console"]
        repeats.append(rec)
        print(json.dumps(rec), flush=True)
    return {"command": "python bench/faults.py " + " ".join(sys.argv[1:]), "fault": "study driver SIGKILL",
            "config": "configs/constitution-qa-tiny.yaml", "sets": STUDY_SETS, "clean_wall_s": clean["wall_s"],
            "clean_trials": list(ref.values()), "repeats": repeats,
            "resumed_ok": f"{sum(bool(r.get('all_complete')) for r in repeats)}/{len(repeats)}"}


def history(out: Path) -> list[dict]:
    return json.loads((out / "constitution-qa-tiny" / "metrics.json").read_text())["history"]


def adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = (load_file(str(p / "constitution-qa-tiny/adapter/adapter_model.safetensors")) for p in (a, b))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def driver_kill(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    model = work / "models/tiny-llama"  # built by the clean run, reused by the others
    clean = train(work / "clean", model)
    assert clean["rc"] == 0, clean["console"]
    ref = history(work / "clean")
    repeats = []
    for i in range(args.repeats):
        out = work / f"r{i}"
        killed = train(out, model, kill_after=args.kill_after_step)
        resumed = train(out, model, resume=True)
        rec = {**killed, "resume_rc": resumed["rc"], "resume_wall_s": resumed["wall_s"]}
        if resumed["rc"] == 0:
            hist = history(out)
            m = re.search(r"resumed at step (\d+)", (out / "constitution-qa-tiny" / "ray.log").read_text())
            start = int(m[1]) if m else None
            steps = [h["step"] for h in hist]
            rec.update(resumed_from_step=start, steps_recomputed=(killed["killed_after_step"] - start) if start else None,
                       history_steps=steps, each_step_once=steps == list(range(1, SETS["train.max_steps"] + 1)),
                       final_loss=hist[-1]["loss"], clean_final_loss=ref[-1]["loss"],
                       max_loss_diff_vs_clean=max(abs(a["loss"] - b["loss"]) for a, b in zip(hist, ref, strict=True)),
                       adapter_max_abs_diff_vs_clean=adapter_diff(out, work / "clean"))
        else:
            rec["resume_console"] = resumed["console"]
        repeats.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "history_steps"}), flush=True)
    ok = [r for r in repeats if r.get("each_step_once")]
    return {"command": "python bench/faults.py " + " ".join(sys.argv[1:]), "fault": "driver SIGKILL mid-training",
            "config": "configs/constitution-qa-tiny.yaml", "sets": SETS, "clean_wall_s": clean["wall_s"],
            "repeats": repeats, "resumed_ok": f"{len(ok)}/{len(repeats)}",
            "median_resume_wall_s": statistics.median(r["resume_wall_s"] for r in repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="fault", required=True)
    d = sub.add_parser("driver-kill")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--kill-after-step", type=int, default=5)
    d.add_argument("--out", default=str(ROOT / "bench/results/faults_driver_kill.json"))
    st = sub.add_parser("study-kill")
    st.add_argument("--repeats", type=int, default=2)
    st.add_argument("--out", default=str(ROOT / "bench/results/faults_study_kill.json"))
    args = ap.parse_args()
    res = driver_kill(args) if args.fault == "driver-kill" else study_kill(args)
    res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=ROOT).stdout.strip()
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
