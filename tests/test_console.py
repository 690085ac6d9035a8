"""The quiet console: a command shows the project's own lines and one progress bar per training run; Ray's,
the workers' and the libraries' output goes to ray.log in the run directory (`-v` keeps it on the console)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def test_train_console_is_quiet_and_a_sigterm_leaves_a_run_that_resumes_exactly(tmp_path, tiny_model_dir):
    """`orchestrator train` shows its own lines and one progress bar (the rest is in ray.log, Ray's core-worker
    lines too); SIGTERM (what Kubernetes sends) stops it with exit 130 and the command that continues it, and
    that command takes the run from its last checkpoint to the end, step 3 again with the same loss."""
    import json
    import shlex
    import signal
    import time

    exe = Path(sys.executable).parent / "orchestrator"
    sets = {"output_dir": tmp_path, "model.name_or_path": tiny_model_dir, "model.build_tiny": "false",
            "data.qa.max_articles": 12, "data.max_seq_length": 128, "data.tokenize_actors": 1,
            "train.max_steps": 6, "train.eval_every": 2, "train.log_every": 1, "scaling.num_workers": 1,
            "train.score_examples": 4}
    argv = [str(exe), "train", str(ROOT / "configs/constitution-qa-tiny.yaml")]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = tmp_path / "constitution-qa-tiny"
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # step 2 saved, step 3 done: stop it there
        if (run / "ray.log").is_file() and '{"step": 3' in (run / "ray.log").read_text():
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    console, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, console[-3000:]
    again = console.strip().splitlines()[-1]
    assert again.startswith("stopped; continue with `orchestrator train "), console[-3000:]
    assert "*** SIG" not in console and "core_worker" not in console
    first = [json.loads(ln[ln.index("{"):]) for ln in (run / "ray.log").read_text().splitlines()
             if '{"step": 3,' in ln][0]

    cmd = shlex.split(again[again.index("`") + 1:-1])
    out = subprocess.run([str(exe), *cmd[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-4000:]
    assert f"Ray and library output: {run / 'ray.log'}" in console
    assert "train constitution-qa-tiny: 100%" in console and "6/6" in console  # the progress bar, to the end
    assert f"adapter: {run / 'adapter'}" in console
    # nothing of Ray's or the workers' own: no step JSON, no Ray Data progress, no worker prefixes, no core worker
    assert '{"step": ' not in console and "RayTrainWorker" not in console and "Dataset dataset_" not in console
    assert "core_worker" not in console and "Warning" not in console
    lines = [ln for ln in console.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("train ")]
    assert len(lines) <= 12, "\n".join(lines)
    log = (run / "ray.log").read_text()
    assert "training backend: hf" in log and '{"step": 6' in log  # the rank-0 worker's lines
    assert "Starting execution of Dataset" in log  # Ray Data's driver-side log
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 7))
    assert history[2]["loss"] == pytest.approx(first["loss"], rel=1e-5)  # step 3 again, from the step-2 save


def _verb(*argv: str, timeout: int = 600) -> tuple[int, str]:
    exe = Path(sys.executable).parent / "orchestrator"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([str(exe), *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return out.returncode, out.stdout + out.stderr


CHATTER = ("newly initialized", "Warning", "warn(", "it/s]", "Loading weights", "Traceback")


def _quiet(console: str, most: int) -> list[str]:
    lines = [ln for ln in console.replace("\r", "\n").splitlines() if ln.strip()]
    assert not [ln for ln in lines if any(c in ln for c in CHATTER)], console[-3000:]
    assert len(lines) <= most, console[-3000:]
    return lines


def test_eval_merge_export_and_serve_consoles_are_quiet(tmp_path, random_adapter, tiny_model_dir):
    """eval, merge, export and serve print the project's own lines; transformers' warnings (a newly initialized
    head), progress bars and FutureWarnings go to the run's log file; serve stops on SIGTERM with exit 0 and
    shuts Serve down, no stack dump."""
    import shutil
    import signal
    import time

    run = tmp_path / "ner"
    shutil.copytree(ROOT / "tests/fixtures/ner-adapter", run / "adapter")
    ner = ROOT / "configs/medical-ner-tiny.yaml"
    code, console = _verb("eval", ner, "--adapter", run / "adapter", "--limit", "16")
    assert code == 0 and "entity-level (seqeval) P/R/F1" in console, console[-3000:]
    _quiet(console, 12)
    code, console = _verb("merge", ner, "--adapter", run / "adapter", "--no-compare", "--examples", "4")
    assert code == 0 and f"merged model: {run / 'merged'}" in console, console[-3000:]
    _quiet(console, 4)
    log = (run / "ray.log").read_text()
    assert "newly initialized" in log or "Some weights" in log  # transformers' head warning, kept in the log

    qa = tmp_path / "qa"
    shutil.copytree(random_adapter, qa / "adapter")
    code, console = _verb("export", ROOT / "configs/constitution-qa-tiny.yaml", "--adapter", qa / "adapter",
                          "--check", "0", "--set", f"model.name_or_path={tiny_model_dir}", "--set",
                          "model.build_tiny=false")
    assert code == 0 and "gguf: " in console, console[-3000:]
    _quiet(console, 3)

    exe = Path(sys.executable).parent / "orchestrator"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([str(exe), "serve", str(ner), "--model", str(run / "merged"), "--set",
                             f"output_dir={tmp_path / 'serve'}", "--set", "serve.port=8741"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "entities:" in line or not line:
            break
    assert any("entities:" in ln for ln in lines), "".join(lines)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    console = "".join(lines) + rest
    assert proc.returncode == 0 and "Serve shut down" in console, console[-3000:]
    assert "core_worker" not in console and "*** SIG" not in console
    _quiet(console, 14)
