"""Ray start-up shared by every verb: join a cluster when there is one, else start a local instance."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

VERBOSE = False  # `-v`: Ray's and the libraries' output on the console too (set by setup_logging)


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
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    elif num_cpus:  # a local instance of that size, even if a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    else:
        ray.init(**kwargs)  # a `ray start` cluster on this machine if there is one, else a new local instance
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    if quiet:
        console.capture_workers()


class Console:
    """The quiet console: a log file for everything Ray and the libraries print, a progress bar per run."""

    def __init__(self):
        self.file = None
        self.path: Path | None = None
        self.bar = None

    def open(self, path: str | Path | None) -> None:
        self.path = Path(path or Path("runs") / "ray.log").resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives with the process)
        self.handler = logging.StreamHandler(self.file)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.reroute()
        logging.captureWarnings(True)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        print(f"Ray and library output: {self.path} (-v shows it here)", flush=True)

    def reroute(self) -> None:
        """Libraries' loggers to the log file (again: Ray Data and Serve set their own handlers when they start)."""
        if self.file is None:
            return
        for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "transformers", "peft", "DeepSpeed",
                     "bitsandbytes", "py.warnings"):
            lg = logging.getLogger(name)
            lg.handlers = [self.handler]
            lg.propagate = False

    def capture_workers(self) -> None:
        """Workers' stdout/stderr lines go to the log file instead of the console (Ray's own handler off);
        Ray Data's logger, configured when it is imported, is routed there again."""
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

        self.reroute()
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("orchestrator_log_file", self._worker_lines)

    def _worker_lines(self, data: dict) -> None:
        who = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
        for line in data.get("lines", []):
            self.file.write(f"{who} {line}\n")
            if self.bar is not None and line.startswith('{"step": '):
                self._step(line)

    def _step(self, line: str) -> None:
        import json

        try:
            m = json.loads(line)
        except ValueError:
            return
        self.bar.update(max(0, m["step"] - self.bar.n))
        self.bar.set_postfix_str(f"loss {m.get('loss', float('nan')):.3f}"
                                 + (f", val {m['val_loss']:.3f}" if "val_loss" in m else ""), refresh=False)

    @contextlib.contextmanager
    def progress(self, desc: str, total: int):
        """A progress bar of optimizer steps for one training run (quiet console only)."""
        if self.file is None:
            yield
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
        try:
            yield
        finally:
            self.bar.close()
            self.bar = None


console = Console()


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
