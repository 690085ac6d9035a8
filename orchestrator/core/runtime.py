"""Ray start-up shared by every verb (join a cluster when there is one, else start a local instance), logging set-up,
and where a `ray job submit` job's outputs land."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from orchestrator.core.console import console

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/, data/, models/
VERBOSE = False  # `-v`: Ray's and the libraries' output on the console too (set by setup_logging)


def quiet(log_file: str | Path) -> None:
    """The quiet console for a verb that may not start Ray (eval, merge, export): the libraries' output to
    ``log_file``, unless ``-v``."""
    if not VERBOSE:
        console.open(log_file)


def init_ray(num_cpus: int | None = None, quiet: bool = True, log_file: str | Path | None = None) -> None:
    """Connect to the cluster named by RAY_ADDRESS (as `ray job submit` sets it), or start Ray locally.

    Unless ``-v``: workers' output, Ray's driver-side logs and Ray Data's progress bars go to ``log_file``
    (default ``ray.log`` in the current directory's ``runs/``), and the console keeps the project's own lines
    and one progress bar per training run (fed by the rank-0 worker's step lines)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    quiet = quiet and not VERBOSE
    kwargs = {"log_to_driver": True, "logging_level": logging.WARNING if quiet else logging.INFO}
    if quiet:
        console.open(log_file)
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    elif num_cpus:  # a local instance of that size, even if a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    else:
        ray.init(**kwargs)  # a `ray start` cluster on this machine if there is one, else a new local instance
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        # Ray's own SIGTERM handler (a stack dump, exit 15) replaced the verb's: put the verb's back
        signal.signal(signal.SIGTERM, on_sigterm)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    if quiet:
        console.capture_workers()


def in_ray_job() -> bool:
    """True in the driver of a `ray job submit` job (its working directory a temporary copy)."""
    return bool(os.environ.get("RAY_JOB_SUBMISSION_ID")) or "runtime_resources" in os.getcwd()


def temporary_outputs_note(output_dirs: list[str]) -> str | None:
    """One line when a job's outputs would land inside its temporary working directory, else None."""
    if not in_ray_job():
        return None
    cwd = Path.cwd().resolve()
    inside = sorted({d for d in output_dirs if Path(d).resolve().is_relative_to(cwd)})
    if not inside:
        return None
    return (f"note: output_dir {', '.join(inside)} is inside this job's temporary working directory: its outputs "
            "(embedded model, adapters, merged models) go with it when the job ends and later jobs will not find "
            "them; set --set output_dir=PATH on storage every node and later job sees")


def setup_logging(verbose: bool = False) -> None:
    global VERBOSE
    VERBOSE = verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("orchestrator").setLevel(logging.INFO)
