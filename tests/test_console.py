"""The quiet console: a command shows the project's own lines and one progress bar per training run; Ray's,
the workers' and the libraries' output goes to ray.log in the run directory (`-v` keeps it on the console)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_train_console_is_quiet_and_the_chatter_is_in_the_run_log(tmp_path, tiny_model_dir):
    exe = Path(sys.executable).parent / "orchestrator"
    sets = {"output_dir": tmp_path, "model.name_or_path": tiny_model_dir, "model.build_tiny": "false",
            "data.qa.max_articles": 12, "data.max_seq_length": 128, "data.tokenize_actors": 1,
            "train.max_steps": 4, "train.eval_every": 2, "train.log_every": 1, "scaling.num_workers": 1}
    argv = [str(exe), "train", str(ROOT / "configs/constitution-qa-tiny.yaml")]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-4000:]
    run = tmp_path / "constitution-qa-tiny"
    assert f"Ray and library output: {run / 'ray.log'}" in console
    assert "train constitution-qa-tiny: 100%" in console and "4/4" in console  # the progress bar, to the end
    assert f"adapter: {run / 'adapter'}" in console
    # nothing of Ray's or the workers' own: no step JSON, no Ray Data progress, no worker prefixes
    assert '{"step": ' not in console and "RayTrainWorker" not in console and "Dataset dataset_" not in console
    lines = [ln for ln in console.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("train ")]
    assert len(lines) <= 12, "\n".join(lines)
    log = (run / "ray.log").read_text()
    assert "training backend: hf" in log and '{"step": 4' in log  # the rank-0 worker's lines
    assert "Starting execution of Dataset" in log  # Ray Data's driver-side log
