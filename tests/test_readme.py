"""The README's shell commands, as written, in README order, on a copy of the checkout: the demo, the local
job sequence against a real `ray start --head` (prepare, train, eval, tune, merge, deploy as separate jobs,
then a request to the deployed model), and the Kubernetes render. Each must exit 0 and leave the outputs the
README names. A command added to the README runs here too, unless it is in SKIP with its reason.

Only three things differ from a user's shell, all listed below: run lengths are shortened with `--set`
(SHORTEN; the demo's output_dir too), the head gets free ports and /tmp/jobruns a test directory
(substitute), and `.venv/bin/` is this interpreter's directory."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, forget_ray_address
from .test_jobs import agent_ports, free_port

# (every substring must be in the command, why it cannot run here)
SKIP = [
    (("apt-get install",), "the install line: CI ran it to get here"),
    (("-m pytest",), "the test command itself"),
    (("python3 -m venv .venv",), "GPU install"),
    (("download.pytorch.org",), "GPU install (CUDA wheels)"),
    (('pip install -e ".[dev]"',), "GPU install"),
    (("HEAD:8265",), "a remote cluster's address"),
    (("python jobs/", "configs/constitution-qa.yaml"), "the 7B GPU config on a cluster"),
    (("/mnt/shared/runs",), "a cluster's shared storage"),
    (("JOB_ID",), "placeholder job id"),
    (("ray job list",), "the cluster block's job listing, before any head runs here"),
    (('"model": "constitution-qa"',), "the GPU configs' served models (the local sequence asks its own)"),
    (("/v1/entities",), "the GPU configs' served models"),
    (("kubectl",), "a Kubernetes cluster"),
    (("ray stop",), "would also stop this test session's Ray; the test stops the head by its process group"),
]
# extra arguments per command (matched by substring), so the run fits the suite's time
TINY = ["--set", "data.qa.max_articles=12", "--set",
        "data.max_seq_length=128", "--set", "data.tokenize_actors=1", "--set", "train.max_steps=2",
        "--set", "train.eval_every=2", "--set", "tune.num_samples=1", "--set", "tune.max_concurrent_trials=1"]
SHORTEN = [
    ("orchestrator demo", [  # outputs under the test's directory, not the checkout's runs/ (which it would reuse)
        "--set", "output_dir={tmp}/runs", "--set", "eval_examples=4", "--set", "set.train.max_steps=4",
        "--set", "set.train.eval_every=2", "--set", "set.train.log_every=2", "--set", "set.data.max_seq_length=128",
        "--set", "set.data.max_examples=120", "--set", "set.data.qa.max_articles=12",
        "--set", "runs.0.tune_set.train.max_steps=2", "--set", "ask.max_tokens=8"]),
    ("jobs/eval.py", ["--limit", "4", *TINY]),
    ("jobs/merge.py", ["--examples", "4", *TINY]),
    ("python jobs/", TINY),
]


def commands(readme: Path) -> list[str]:
    """Every command of the README's ```bash blocks: continuation lines joined, comments dropped."""
    out, block = [], None
    for line in readme.read_text().splitlines():
        if line.startswith("```"):
            block = [] if line.strip() == "```bash" and block is None else None
            continue
        if block is None:
            continue
        text = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1].rstrip() + " " + text.strip()
        elif text.strip():
            out.append(text.strip())
    return out


def skipped(cmd: str) -> str | None:
    return next((why for parts, why in SKIP if all(p in cmd for p in parts)), None)


def test_readme_lists_the_commands_this_test_runs():
    cmds = commands(ROOT / "README.md")
    assert ".venv/bin/orchestrator demo" in cmds
    runnable = [c for c in cmds if not skipped(c)]
    assert sum("ray job submit" in c for c in runnable) == 6 and any(c.startswith("ray start --head") for c in runnable)
    assert [c for c in cmds if skipped(c) == "the test command itself"] == [".venv/bin/python -m pytest"]


@pytest.mark.timeout(1500)
def test_readme_commands_run_as_written(tmp_path):
    work = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes((ROOT / rel).read_bytes())
    gcs, dash = free_port(), free_port()
    # every port of the head free (this session's own Ray already holds the default agent ports)
    ports = " ".join(agent_ports())
    substitute = [("ray start --head", f"ray start --head --port={gcs} --dashboard-port={dash} {ports}"),
                  ("127.0.0.1:8265", f"127.0.0.1:{dash}"), ("/tmp/jobruns", str(tmp_path / "jobruns"))]
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "RAY_DEDUP_LOGS": "1",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    head_group, ran = None, []
    try:
        for cmd in commands(work / "README.md"):
            if skipped(cmd):
                continue
            for old, new in substitute:
                cmd = cmd.replace(old, new)
            cmd = cmd.replace(".venv/bin/", bindir + "/")
            extra = next((args for key, args in SHORTEN if key in cmd), [])
            if m := re.fullmatch(r"export (\w+)=(\S+)", cmd):
                env[m[1]] = m[2]
                continue
            line = cmd + "".join(" " + shlex.quote(a.format(tmp=tmp_path)) for a in extra)
            t0 = time.time()
            for _ in range(24):  # a head just started may not have its job agent yet: Ray says to try again
                proc = subprocess.Popen(["bash", "-c", line], cwd=work, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
                if cmd.startswith("ray start --head"):
                    head_group = proc.pid  # its daemons stay in this process group
                out, _ = proc.communicate(timeout=900)
                if "No available agent to submit job" not in out:
                    break
                time.sleep(5)
            ran.append((cmd, round(time.time() - t0)))
            assert proc.returncode == 0, f"README command failed ({proc.returncode}): {line}\n{out[-6000:]}"
            if cmd.endswith("orchestrator demo"):  # the quiet console: the libraries' banners are in the log
                assert "Configuration for experiment" not in out and "View detailed results" not in out, out[-4000:]
            if cmd.startswith("curl"):
                assert '"id":"constitution-qa-tiny"' in out.replace(" ", ""), out
            if "python jobs/" in cmd and "--set output_dir=" in cmd:
                assert "temporary working directory" not in out
        print(json.dumps(ran, indent=1))
    finally:
        if head_group:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(head_group, sig)
                except ProcessLookupError:
                    break
                time.sleep(5)
            forget_ray_address(gcs)
    # the outputs the README names
    demo = tmp_path / "runs/demo"
    assert (demo / "report.md").exists() and (demo / "summary.json").exists() and (demo / "losses.png").exists()
    for run in ("constitution-qa-tiny", "medical-ner-tiny"):
        assert (demo / run / "merged/config.json").exists() and (demo / run / "merged/merge.json").exists()
    summary = json.loads((demo / "summary.json").read_text())
    qa = summary["answers"]["constitution-qa-tiny"]
    assert [a["question"] for a in qa][0].startswith("What does Article 16") and all("answer" in a for a in qa)
    for run in ("constitution-qa-tiny", "medical-ner-tiny"):  # the fine-tune's value and its cost, per run
        figures = summary["runs"][run]
        assert 0.0 <= figures["base_val_f1"] <= 1.0 and 0.0 <= figures["finetuned_val_f1"] <= 1.0
        assert figures["cost"]["cpu_core_hours"] > 0 and figures["cost"]["wall_s"] > 0
    assert "base val F1" in summary["table"][0] and "fine-tuned val F1" in summary["table"][0]
    ner = summary["answers"]["medical-ner-tiny"]
    assert len(ner) == 2 and all(isinstance(a["entities"], list) for a in ner)
    jobs = tmp_path / "jobruns/constitution-qa-tiny"
    base = json.loads((jobs / "adapter/adapter_config.json").read_text())["base_model_name_or_path"]
    assert base.endswith("models/constitution-tiny-llama")  # the shipped base, travelled with the working dir
    for out in ("adapter/adapter_model.safetensors", "eval.json", "trials.csv", "best_config.yaml",
                "merged/config.json", "merged/README.md"):
        assert (jobs / out).exists(), out
    assert (work / "k8s/rayjob.yaml").exists() and (work / "k8s/rayservice.yaml").exists()
