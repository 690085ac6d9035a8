"""Ray start-up shared by every verb: join a cluster when there is one, else start a local instance."""

from __future__ import annotations

import logging
import os


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to the cluster named by RAY_ADDRESS (as `ray job submit` sets it), or start Ray locally."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = {"log_to_driver": True, "logging_level": logging.WARNING if quiet else logging.INFO}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    elif num_cpus:  # a local instance of that size, even if a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    else:
        ray.init(**kwargs)  # a `ray start` cluster on this machine if there is one, else a new local instance
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True


def in_ray_job() -> bool:
    """True in the driver of a `ray job submit` job (its working directory a temporary copy)."""
    return bool(os.environ.get("RAY_JOB_SUBMISSION_ID")) or "runtime_resources" in os.getcwd()


def temporary_outputs_note(output_dirs: list[str]) -> str | None:
    """One line when a job's outputs would land inside its temporary working directory, else None."""
    from pathlib import Path

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
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("orchestrator").setLevel(logging.INFO)
