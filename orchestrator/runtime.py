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


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("orchestrator").setLevel(logging.INFO)
