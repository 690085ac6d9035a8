"""A finished optimizer step's figures, read once from the device, turned into the step's metrics: kept in the
history, printed (the console's progress bar reads these lines), tracked and reported to Ray Train."""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_on_host(figures: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``figures`` copied to pinned host memory behind the work queued so far, with an event marking the copy.

    A plain ``.tolist()`` on a CUDA tensor waits for everything queued on the stream, so reading a step's
    figures after the next step's forward and backward were queued would still stall the host until those
    finish; waiting on this event waits for the copy alone. On the CPU: the tensor itself, no event."""
    if figures.device.type != "cuda":
        return figures, None
    host = torch.empty(figures.shape, dtype=figures.dtype, pin_memory=True)
    host.copy_(figures, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


@dataclass
class StepDone:
    """An optimizer step whose device work is queued: its figures (loss sum, real tokens, gradient norm) on
    their way to the host, and what the host already knows."""

    step: int
    epoch: float
    lr: float
    data_wait_s: float
    is_eval: bool
    figures: tuple[torch.Tensor, Any]


class StepRecorder:
    """Turns finished steps into metrics. Tokens/s is measured over the window since the last recorded step;
    peak memory is the training steps' peak on a GPU (the set-up's is kept apart, as trainers measure it).
    ``validate`` runs on eval steps, ``checkpoint(metrics)`` saves and reports them."""

    def __init__(self, rank: int, world: int, device: torch.device, log_every: int, history: list[dict[str, Any]],
                 validate: Callable[[], dict[str, float]], checkpoint: Callable[[dict[str, Any]], None],
                 tracker=None, about: dict[str, Any] | None = None, started: float | None = None):
        self.rank, self.world, self.device, self.log_every = rank, world, device, log_every
        self.history, self.validate, self.checkpoint, self.tracker = history, validate, checkpoint, tracker
        self.setup_peak_mb, self.t_window, self.tok_window = 0.0, time.perf_counter(), 0
        # what the run's cost report needs from a worker, on this attempt's first recorded step: the set-up's
        # seconds (worker start to the first step), the device, the model FLOPs per token
        self.about, self.started = dict(about or {}), started

    def start(self) -> None:
        """The steps begin: the set-up's peak memory and seconds are kept apart and the first window opens."""
        if self.started is not None:
            self.about["setup_s"] = time.perf_counter() - self.started
        self.setup_peak_mb = peak_memory_mb(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t_window, self.tok_window = time.perf_counter(), 0

    def record(self, done: StepDone) -> None:
        """Read the step's figures (the one host sync of a step), then keep, print, track and report them;
        eval steps also validate and checkpoint."""
        import ray.train

        figures, ready = done.figures
        if ready is not None:  # wait for the copy alone, not for the work queued after it
            ready.synchronize()
        loss, tokens, norm = figures.tolist()
        metrics = self._metrics(done, loss, int(tokens), norm)
        metrics.update(self.about)
        self.about = {}
        if done.is_eval:
            t0 = time.perf_counter()
            metrics.update(self.validate())
            metrics["eval_s"] = time.perf_counter() - t0
        self.history.append(metrics)
        if self.rank == 0 and (done.step % self.log_every == 0 or done.is_eval):
            print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}))
            if self.tracker:
                self.tracker.log({**metrics, "tokens_per_s_per_gpu": metrics["tokens_per_s"] / self.world}, done.step)
        if done.is_eval:
            t0 = time.perf_counter()
            self.checkpoint(metrics)
            metrics["checkpoint_s"] = time.perf_counter() - t0  # in the history of the checkpoints after this one
        elif done.step % self.log_every == 0:
            ray.train.report(metrics)

    def _metrics(self, done: StepDone, loss: float, tokens: int, norm: float) -> dict[str, Any]:
        self.tok_window += tokens
        now = time.perf_counter()
        tokens_total = self.tok_window * self.world
        metrics = {"step": done.step, "epoch": done.epoch, "loss": loss, "lr": done.lr, "grad_norm": norm,
                   "tokens_per_s": tokens_total / max(now - self.t_window, 1e-9), "real_tokens": tokens_total,
                   "step_time_s": now - self.t_window, "data_wait_s": done.data_wait_s, "timestamp": time.time(),
                   "peak_memory_mb": peak_memory_mb(self.device), "setup_peak_memory_mb": self.setup_peak_mb}
        if self.device.type == "cuda":
            metrics["peak_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2**20
        self.t_window, self.tok_window = now, 0
        return metrics
