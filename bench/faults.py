"""Fault injection with figures: a training or study driver killed mid-run, then `--resume` (RELIABILITY.md).

    python bench/faults.py driver-kill --repeats 3 [--kill-after-step 5] [--signal kill|term] [--out ...]
    python bench/faults.py study-kill --repeats 2 [--signal kill|term] [--out bench/results/faults_study_kill.json]

--signal term sends SIGTERM (what Kubernetes and systemd send) to the driver alone instead of SIGKILL to its
process group: the command must stop with exit 130 and print the command that continues it, and the resume
runs that printed command as it is.

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
import contextlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETS = {"model.tiny_pretrain_steps": 10, "data.qa.max_articles": 12, "data.max_seq_length": 128,
        "data.tokenize_actors": 1, "train.max_steps": 12, "train.eval_every": 2, "train.log_every": 1,
        "train.keep_checkpoints": 2}


def train(out: Path, model: Path, resume: bool = False, kill_after: int | None = None, sig: str = "kill") -> dict:
    argv = [str(Path(sys.executable).parent / "orchestrator"), "train", str(ROOT / "configs/constitution-qa-tiny.yaml")]
    for k, v in {**SETS, "output_dir": out, "model.name_or_path": model}.items():  # one tiny base for all runs
        argv += ["--set", f"{k}={v}"]
    if resume:
        argv += ["--resume", str(out / "constitution-qa-tiny")]
    return _run(argv, out, kill_after, sig)


def _run(argv: list[str], out: Path, kill_after: int | None, sig: str = "kill") -> dict:
    """Run a CLI command in its own process group; with ``kill_after``, once the rank-0 worker's line for that
    step shows in the run's ray.log, SIGKILL the group (``sig`` kill) or SIGTERM the driver (``sig`` term: its exit
    code and the continue command it printed are recorded)."""
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
    if sig == "term":
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=300)
        last = text.strip().splitlines()[-1] if text.strip() else ""
        return {"killed_after_step": seen, "wall_s": round(time.time() - t0, 1), "rc": proc.returncode,
                "printed": last.replace(f"{ROOT}/", ""), "stack_dump": "*** SIG" in text}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    return {"killed_after_step": seen, "wall_s": round(time.time() - t0, 1)}


def resume_run(killed: dict, out: Path, again) -> dict:
    """After SIGTERM, the printed continue command as it is; after SIGKILL, ``again()`` (the --resume command)."""
    if "printed" not in killed:
        return again()
    line = killed["printed"]
    if killed["rc"] != 130 or "continue with `" not in line:
        return {"rc": None, "wall_s": 0.0, "console": f"no continue command after SIGTERM: {line}"}
    cmd = shlex.split(line[line.index("`") + 1:line.rindex("`")])
    return _run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], out, None)


STUDY_SETS = {**SETS, "train.max_steps": 6, "tune.num_samples": 1, "tune.max_concurrent_trials": 1,
              "tune.scheduler": "none", "tune.search_space": '{"train.lr": {"type": "grid", "values": [0.003, 0.001]}}'}


def tune(out: Path, model: Path, resume: bool = False, kill_after: int | None = None, sig: str = "kill") -> dict:
    argv = [str(Path(sys.executable).parent / "orchestrator"), "tune", str(ROOT / "configs/constitution-qa-tiny.yaml")]
    for k, v in {**STUDY_SETS, "output_dir": out, "model.name_or_path": model}.items():
        argv += ["--set", f"{k}={v}"]
    if resume:
        argv += ["--resume"]
    return _run(argv, out, kill_after, sig)


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
        killed = tune(out, model, kill_after=3, sig=args.signal)
        resumed = resume_run(killed, out, lambda out=out: tune(out, model, resume=True))
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
    return {"command": "python bench/faults.py " + " ".join(sys.argv[1:]), "fault": f"study driver SIG{args.signal.upper()}",
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
        killed = train(out, model, kill_after=args.kill_after_step, sig=args.signal)
        resumed = resume_run(killed, out, lambda out=out: train(out, model, resume=True))
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
    return {"command": "python bench/faults.py " + " ".join(sys.argv[1:]), "fault": f"driver SIG{args.signal.upper()} mid-training",
            "config": "configs/constitution-qa-tiny.yaml", "sets": SETS, "clean_wall_s": clean["wall_s"],
            "repeats": repeats, "resumed_ok": f"{len(ok)}/{len(repeats)}",
            "median_resume_wall_s": statistics.median(r["resume_wall_s"] for r in repeats)}


STATE = "trainer_state.pt"  # orchestrator.train.STATE_FILE


def checkpoints(out: Path) -> list[Path]:
    return sorted(d for d in (out / "constitution-qa-tiny" / "train").glob("checkpoint_*") if d.is_dir())


def files_of(d: Path) -> dict[str, int]:
    return {str(f.relative_to(d)): f.stat().st_size for f in sorted(d.rglob("*")) if f.is_file()}


def ckpt_kill(args) -> dict:
    """SIGKILL the training's process group the moment the storage directory of its Nth checkpoint appears
    (Ray Train is copying it there), then --resume; the directory left behind is recorded as found."""
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    model = work / "models/tiny-llama"
    clean = train(work / "clean", model)
    assert clean["rc"] == 0, clean["console"]
    ref = history(work / "clean")
    complete = files_of(checkpoints(work / "clean")[-1])
    repeats = []
    for i in range(args.repeats):
        out = work / f"r{i}"
        argv = [str(Path(sys.executable).parent / "orchestrator"), "train", str(ROOT / "configs/constitution-qa-tiny.yaml")]
        for k, v in {**SETS, "output_dir": out, "model.name_or_path": model}.items():
            argv += ["--set", f"{k}={v}"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        t0 = time.time()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        while proc.poll() is None and len(checkpoints(out)) < args.kill_at_checkpoint:
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        cks = checkpoints(out)
        if args.cut_short and cks:  # leave what a kill in the middle of the copy leaves: a file cut, one missing
            biggest = max((f for f in cks[-1].rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
            biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
            (cks[-1] / STATE).unlink(missing_ok=True)
        left = files_of(cks[-1]) if cks else {}
        # part-way: files missing, or cut short (every file but the growing training state has a fixed size)
        partial = set(left) != set(complete) or any(left[f] != complete[f] for f in left if f != STATE)
        time.sleep(2)
        resumed = train(out, model, resume=True)
        rec = {"killed_after_s": round(time.time() - t0, 1), "checkpoint_dirs_at_kill": len(cks),
               "files_in_interrupted_checkpoint": len(left), "files_in_a_complete_one": len(complete),
               "interrupted_part_way": bool(partial), "resume_rc": resumed["rc"], "resume_wall_s": resumed["wall_s"]}
        if resumed["rc"] == 0:
            hist = history(out)
            m = re.search(r"resumed at step (\d+)", (out / "constitution-qa-tiny" / "ray.log").read_text())
            steps = [h["step"] for h in hist]
            rec.update(resumed_from_step=int(m[1]) if m else None,
                       each_step_once=steps == list(range(1, SETS["train.max_steps"] + 1)),
                       max_loss_diff_vs_clean=max(abs(a["loss"] - b["loss"]) for a, b in zip(hist, ref, strict=True)),
                       adapter_max_abs_diff_vs_clean=adapter_diff(out, work / "clean"))
        else:
            rec["resume_console"] = resumed["console"]
        repeats.append(rec)
        print(json.dumps(rec), flush=True)
    ok = [r for r in repeats if r.get("each_step_once")]
    return {"command": "python bench/faults.py " + " ".join(sys.argv[1:]),
            "fault": "process group SIGKILL while a checkpoint is being written to storage",
            "config": "configs/constitution-qa-tiny.yaml", "sets": SETS, "complete_checkpoint_files": complete,
            "repeats": repeats, "resumed_ok": f"{len(ok)}/{len(repeats)}",
            "interrupted_part_way": f"{sum(r['interrupted_part_way'] for r in repeats)}/{len(repeats)}"}


# ---------------------------------------------------------------- Serve: a replica killed under load, overload

QUESTION = {"role": "user", "content": "What does Article 16 of the Constitution of Nepal provide?"}


def serve_model(work: Path) -> Path:
    """The embedded tiny Llama (pre-trained for a few steps), as a served causal LM."""
    from orchestrator.core.config import load_config
    from orchestrator.data.base import ensure_model

    sets = [f"{k}={v}" for k, v in {**SETS, "output_dir": work}.items()]
    return Path(ensure_model(load_config(ROOT / "configs/constitution-qa-tiny.yaml", sets)))


@contextlib.contextmanager
def served(port: int, dashboard: bool = False, **spec):
    """A local Ray serving the embedded tiny Llama as model ``qa`` (``spec``: its deployment settings); yields
    the base URL once every replica is RUNNING, shuts Serve and Ray down after."""
    import ray
    from ray import serve

    from orchestrator.deployment.launcher import start

    model = serve_model(Path(tempfile.mkdtemp(prefix="faults-serve-")))
    ray.init(num_cpus=2, include_dashboard=dashboard, log_to_driver=False)
    try:
        args = {"models": [{"name": "qa", "task": "causal_lm", "path": str(model), "num_cpus": 0,
                            "max_input_length": 128, "max_tokens_limit": 64, **spec}]}
        url = start(args, "127.0.0.1", port)
        wait_running(spec.get("autoscaling", {}).get("min_replicas", 1), 300)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def running_replicas(deployment: str = "TextGenerator-qa") -> int:
    """RUNNING replicas of the model's deployment (the gateway's own replica not counted)."""
    from ray import serve

    app = serve.status().applications.get("orchestrator")
    dep = app.deployments.get(deployment) if app else None
    return dep.replica_states.get("RUNNING", 0) if dep else 0


def wait_running(n: int, timeout: float) -> float:
    t0 = time.time()
    while running_replicas() < n:
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{n} replicas not RUNNING after {timeout} s")
        time.sleep(0.2)
    return time.time() - t0


def ask(client, url: str, out: list, stop: threading.Event | None = None, max_tokens: int = 32,
        stream: bool = False) -> None:
    """Send chat requests (one, or until ``stop``); record each one's start, end, status and whether its
    answer came whole (a stream: ended by ``[DONE]``; ``stream_error``: ended by an error event). A request
    without an answer in 60 s counts as hung."""
    import httpx

    body = {"model": "qa", "messages": [QUESTION], "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    while True:
        t0 = time.time()
        rec = {"start": t0, "stream": stream}
        try:
            if stream:
                with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                    lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                rec.update(status=r.status_code, whole=bool(lines) and lines[-1] == "data: [DONE]",
                           stream_error=any('"error"' in line for line in lines))
            else:
                r = client.post(f"{url}/v1/chat/completions", json=body, timeout=60)
                rec.update(status=r.status_code, whole=r.status_code == 200 and "choices" in r.json())
        except httpx.TimeoutException:
            rec.update(status="hung")
        except httpx.HTTPError as e:
            rec.update(status=f"connection error: {type(e).__name__}")
        rec["end"] = time.time()
        out.append(rec)
        if stop is None or stop.is_set():
            return


def replica_pids() -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
            if "ServeReplica" in (a.class_name or "") and "TextGenerator-qa" in (a.class_name or "")]


def outcomes(rs: list[dict]) -> dict[str, int]:
    """Status -> count; a 200 stream that ended in an error event, or incomplete, counted apart."""
    keys = [f"{r['status']}{' stream, error event' if r.get('stream_error') else ''}"
            f"{' incomplete' if r['status'] == 200 and not r.get('whole') else ''}" for r in rs]
    return {k: keys.count(k) for k in sorted(set(keys))}


def serve_kill(args) -> dict:
    """Two replicas under ``clients`` closed-loop clients; one replica's process SIGKILLed mid-load."""
    import httpx

    repeats = []
    with served(args.port, dashboard=True, autoscaling={"min_replicas": 2, "max_replicas": 2},
                max_ongoing_requests=4, max_queued_requests=64) as url:
        for _ in range(args.repeats):
            wait_running(2, 300)
            log, stop = [], threading.Event()
            with httpx.Client() as client:
                threads = [threading.Thread(target=ask, args=(client, url, log, stop), kwargs={"stream": k % 2 == 1})
                           for k in range(args.clients)]  # half the clients stream
                for t in threads:
                    t.start()
                time.sleep(args.warmup_s)
                pids = replica_pids()
                t_kill = time.time()
                os.kill(pids[0], signal.SIGKILL)
                noticed = None
                while time.time() - t_kill < 300:  # the controller notices, starts a replacement, it turns healthy
                    n = running_replicas()
                    if n < 2 and noticed is None:
                        noticed = time.time() - t_kill
                    if noticed is not None and n == 2:
                        break
                    time.sleep(0.1)
                recovered_s = time.time() - t_kill
                time.sleep(args.after_s)
                stop.set()
                for t in threads:
                    t.join(120)
            in_flight = [r for r in log if r["start"] < t_kill < r["end"]]
            after = [r for r in log if r["start"] >= t_kill]
            rec = {"replicas": 2, "clients": args.clients, "killed_pid": pids[0], "requests": len(log),
                   "in_flight_at_kill": outcomes(in_flight), "started_after_kill": outcomes(after),
                   "hung": sum(1 for r in log if r["status"] == "hung"),
                   "death_noticed_after_s": round(noticed, 1) if noticed is not None else None,
                   "replica_back_after_s": round(recovered_s, 1) if noticed is not None else None,
                   "max_latency_in_flight_s": round(max((r["end"] - r["start"] for r in in_flight), default=0), 2),
                   "ok_after_kill": sum(1 for r in after if r["status"] == 200 and r["whole"]),
                   "streams": sum(1 for r in log if r["stream"])}
            repeats.append(rec)
            print(json.dumps(rec), flush=True)
    return {"command": "python bench/faults.py " + " ".join(sys.argv[1:]), "fault": "Serve replica SIGKILL under load",
            "model": "embedded tiny Llama (configs/constitution-qa-tiny.yaml), 2 replicas, max_tokens 32",
            "repeats": repeats, "none_hung": all(r["hung"] == 0 for r in repeats)}


def overload(args) -> dict:
    """Bursts of ``clients`` simultaneous requests at one replica that admits max_ongoing + max_queued."""
    import httpx

    bursts = []
    with served(args.port, max_ongoing_requests=args.max_ongoing, max_queued_requests=args.max_queued,
                max_batch_size=args.max_ongoing) as url:
        with httpx.Client(limits=httpx.Limits(max_connections=args.clients + 8)) as client:
            ask(client, url, [])  # warm
            for _ in range(args.repeats):
                log, gate = [], threading.Barrier(args.clients)

                def one(log=log, gate=gate):
                    gate.wait()
                    ask(client, url, log)

                threads = [threading.Thread(target=one) for _ in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(180)
                lat = lambda rs: sorted(r["end"] - r["start"] for r in rs)  # noqa: E731
                ok, shed = [r for r in log if r["status"] == 200], [r for r in log if r["status"] == 503]
                q = lambda xs, f: round(xs[min(len(xs) - 1, int(f * len(xs)))], 3) if xs else None  # noqa: E731
                rec = {"clients": args.clients, "admitted": len(ok), "shed_503": len(shed),
                       "other": len(log) - len(ok) - len(shed),
                       "admitted_p50_s": q(lat(ok), 0.5), "admitted_p99_s": q(lat(ok), 0.99),
                       "shed_p50_s": q(lat(shed), 0.5), "shed_p99_s": q(lat(shed), 0.99)}
                bursts.append(rec)
                print(json.dumps(rec), flush=True)
                time.sleep(2)
    return {"command": "python bench/faults.py " + " ".join(sys.argv[1:]), "fault": "overload beyond the queue",
            "model": "embedded tiny Llama, 1 replica, max_tokens 32",
            "max_ongoing_requests": args.max_ongoing, "max_queued_requests": args.max_queued, "bursts": bursts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="fault", required=True)
    d = sub.add_parser("driver-kill")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--kill-after-step", type=int, default=5)
    d.add_argument("--signal", choices=["kill", "term"], default="kill")
    d.add_argument("--out", default=str(ROOT / "bench/results/faults_driver_kill.json"))
    st = sub.add_parser("study-kill")
    st.add_argument("--repeats", type=int, default=2)
    st.add_argument("--signal", choices=["kill", "term"], default="kill")
    st.add_argument("--out", default=str(ROOT / "bench/results/faults_study_kill.json"))
    ck = sub.add_parser("ckpt-kill")
    ck.add_argument("--repeats", type=int, default=3)
    ck.add_argument("--kill-at-checkpoint", type=int, default=2)
    ck.add_argument("--cut-short", action="store_true", help="after the kill, cut the interrupted checkpoint's "
                    "largest file to half and remove its training state, as a kill mid-copy would leave it")
    ck.add_argument("--out", default=str(ROOT / "bench/results/faults_ckpt_kill.json"))
    sk = sub.add_parser("serve-kill")
    sk.add_argument("--repeats", type=int, default=3)
    sk.add_argument("--clients", type=int, default=8)
    sk.add_argument("--warmup-s", type=float, default=5)
    sk.add_argument("--after-s", type=float, default=5)
    sk.add_argument("--port", type=int, default=8790)
    sk.add_argument("--out", default=str(ROOT / "bench/results/faults_serve_kill.json"))
    ov = sub.add_parser("overload")
    ov.add_argument("--repeats", type=int, default=3)
    ov.add_argument("--clients", type=int, default=64)
    ov.add_argument("--max-ongoing", type=int, default=4)
    ov.add_argument("--max-queued", type=int, default=8)
    ov.add_argument("--port", type=int, default=8791)
    ov.add_argument("--out", default=str(ROOT / "bench/results/faults_overload.json"))
    args = ap.parse_args()
    res = {"driver-kill": driver_kill, "study-kill": study_kill, "ckpt-kill": ckpt_kill, "serve-kill": serve_kill,
           "overload": overload}[args.fault](args)
    res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=ROOT).stdout.strip()
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
