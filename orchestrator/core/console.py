"""The quiet console: what Ray and the libraries print goes to the run's log file; the console keeps the
project's own lines and one progress bar per training run (fed by the rank-0 worker's step lines)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path


def _keep_file_handler(handler: logging.Handler) -> None:
    """``Logger.addHandler`` of a rerouted library logger: its records already go to the run's log file."""


def _ours(record: logging.LogRecord) -> bool:
    return record.name.startswith("orchestrator")


class Console:
    """The quiet console: a log file for everything Ray and the libraries print, a progress bar per run."""

    def __init__(self):
        self.file = None
        self.path: Path | None = None
        self.bar = None

    def open(self, path: str | Path | None) -> None:
        if self.file is not None:  # already quiet (a verb that then starts Ray): one log file per command
            self.reroute()
            return
        self.path = Path(path or Path("runs") / "ray.log").resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives with the process)
        self.handler = logging.StreamHandler(self.file)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.reroute()
        self.native_stderr_to_file()
        logging.captureWarnings(True)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:  # transformers' own bars (loading weights) and its warnings, if it is imported already
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_warning()  # its warnings (a newly initialized head) to the log file
        except ImportError:
            pass
        print(f"Ray and library output: {self.path} (-v shows it here)", flush=True)

    def reroute(self) -> None:
        """Libraries' loggers to the log file (again: Ray Data and Serve set their own handlers when they start)."""
        if self.file is None:
            return
        for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "transformers", "peft", "DeepSpeed",
                     "bitsandbytes", "kernels", "py.warnings"):
            lg = logging.getLogger(name)
            lg.handlers = [self.handler]
            lg.propagate = False
            # a library that adds its own console handler when imported later (DeepSpeed does) adds nothing
            lg.addHandler = _keep_file_handler
        root = logging.getLogger()
        for h in root.handlers:  # the console's handlers keep the project's records; the rest go to the file
            if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr) and _ours not in h.filters:
                h.addFilter(_ours)
        if self.handler not in root.handlers:
            root.addHandler(self.handler)

    @contextlib.contextmanager
    def library_prints(self):
        """What a library prints to stdout inside the block (Ray Tune's experiment banner) goes to the log file."""
        if self.file is None:
            yield
            return
        with contextlib.redirect_stdout(self.file):
            yield

    def native_stderr_to_file(self) -> None:
        """What native code writes to file descriptor 2 (Ray's core worker in this process, the processes it
        starts) goes to the log file; Python's ``sys.stderr`` (the project's errors, progress bars) moves to a
        copy of the console's descriptor, and the logging handlers that wrote to it follow."""
        try:
            on_fd2 = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):  # a captured stream (tests): Python's side stays as it is
            on_fd2 = False
        sys.stderr.flush()
        if on_fd2:
            old = sys.stderr
            new = open(os.dup(2), "w", buffering=1, encoding=old.encoding, errors="backslashreplace")  # noqa: SIM115
            for h in logging.getLogger().handlers:
                if isinstance(h, logging.StreamHandler) and h.stream is old:
                    h.setStream(new)
            sys.stderr = new
        os.dup2(self.file.fileno(), 2)

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
