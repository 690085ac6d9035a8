"""The quiet console: what Ray and the libraries print goes to the run's log file; the console keeps the
project's own lines and one progress bar per training run (fed by the rank-0 worker's step lines)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path


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
