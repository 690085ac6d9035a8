"""A worker's training state in Ray Train checkpoints: saved at every validation, restored exactly on resume.

A checkpoint holds the adapter (standard PEFT files, the tokenizer, ``labels.json`` for NER), the optimizer
(one file; under ZeRO one partition per rank), the scheduler, every rank's RNG states, the global step and
the data position (epoch, micro-batches consumed). Each rank's shard is a deterministic split of the training
set, shuffled per epoch with a seeded local buffer, so on resume the loop skips exactly the micro-batches
already consumed and no optimizer step is lost or repeated.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.core.config import ConfigError, RunConfig

STATE_FILE = "trainer_state.pt"
OPTIMIZER_FILES = "optimizer-rank*.pt"


@dataclass
class Position:
    """Where a worker is in the run: optimizer steps taken, epoch, micro-batches of it consumed, and every
    finished step's metrics so far."""

    step: int = 0
    epoch: int = 0
    micro_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def optimizer_file(rank: int) -> str:
    """Under ZeRO each rank checkpoints its own optimizer partition (one of OPTIMIZER_FILES)."""
    return f"optimizer-rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: Path) -> Any:
    """A checkpoint file, unpickled with ``weights_only=True``: tensors, containers and plain values, plus
    DeepSpeed's loss-scaler records in a ZeRO optimizer partition; nothing else executes on load."""
    allowed: list[Any] = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum]
    except ImportError:
        pass
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 (one line naming the file; pickle errors are long)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = f"it holds {found.group(1)}" if found else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise RuntimeError(f"{path}: not a checkpoint this version can load safely ({why})") from e


def portable_adapter_config(adapter: Path, name_or_path: str) -> None:
    """Record the base as the config names it (hub id, ``package:`` or the user's path), not as this
    machine resolved it, so the adapter is portable."""
    f = adapter / "adapter_config.json"
    conf = json.loads(f.read_text())
    conf["base_model_name_or_path"] = name_or_path
    f.write_text(json.dumps(conf, indent=2))


def check_resumable(ray_dir: Path, cfg: RunConfig) -> None:
    """A ZeRO checkpoint holds one optimizer partition per rank, so it resumes only under ZeRO with the number
    of workers that wrote it; a DDP checkpoint holds the whole optimizer and resumes on any number, not under ZeRO."""
    checkpoints = sorted(ray_dir.glob("checkpoint_*"))  # Ray Train names them by time
    if not checkpoints:
        return
    last = checkpoints[-1]
    parts = len(list(last.glob(OPTIMIZER_FILES)))
    zero = cfg.train.strategy != "ddp"
    if parts and (not zero or parts != cfg.scaling.num_workers):
        raise ConfigError(f"--resume: {last} holds the DeepSpeed ZeRO optimizer partitions of {parts} workers; "
                          f"resume with the train.strategy that wrote it and scaling.num_workers={parts} "
                          f"(this run: {cfg.train.strategy}, {cfg.scaling.num_workers} workers)")
    if zero and not parts:
        raise ConfigError(f"--resume: {last} was written with train.strategy=ddp (one whole optimizer state); "
                          f"resume it with train.strategy=ddp, not {cfg.train.strategy}")


class Checkpointer:
    """Restores a worker from the checkpoint Ray Train hands it, and saves one (with the report) at validation."""

    def __init__(self, cfg: RunConfig, rank: int, world: int, labels: list[str] | None):
        self.cfg, self.rank, self.world, self.labels = cfg, rank, world, labels

    def load_weights(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """The adapter weights of the checkpoint put into ``model`` (before DDP/DeepSpeed wraps it: ZeRO-3
        partitions them); returns the rest of the state for :meth:`resume`, or None on a fresh start."""
        import ray.train
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return None
        with checkpoint.as_directory() as d:
            state = load_state(Path(d) / STATE_FILE)
            set_peft_model_state_dict(model, load_file(str(Path(d) / "adapter" / "adapter_model.safetensors")))
            if (Path(d) / optimizer_file(self.rank)).exists():  # ZeRO: each rank's own partition
                state["optimizer"] = load_state(Path(d) / optimizer_file(self.rank))
        return state

    def resume(self, state: dict[str, Any] | None, strategy, scheduler) -> Position:
        """Optimizer, schedule and RNGs as they were, and where the run stopped; a fresh position without state."""
        if not state:
            return Position()
        strategy.load_optimizer_state(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
        position = Position(state["step"], state["epoch"], state["micro_done"], state["history"])
        if self.rank == 0:
            print(f"resumed at step {position.step} (epoch {position.epoch}, {position.micro_done} micro-batches "
                  "into it)")
        return position

    def save(self, metrics: dict[str, Any], position: Position, strategy, scheduler, tokenizer) -> None:
        """Write the checkpoint (every rank's part into one directory) and report it with ``metrics``."""
        import ray.train
        import torch.distributed as dist

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            with strategy.full_weights():
                if self.rank == 0:
                    self._save_adapter(strategy.core, tokenizer, Path(tmp) / "adapter")
            rngs = [None] * self.world
            if self.world > 1:
                dist.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            if strategy.per_rank_optimizer_state:  # every rank's files merge into one checkpoint directory
                torch.save(strategy.optimizer_state(), Path(tmp) / optimizer_file(self.rank))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            if self.rank == 0:
                shared = None if strategy.per_rank_optimizer_state else strategy.optimizer_state()
                torch.save({"optimizer": shared, "scheduler": scheduler.state_dict(), "rng": rngs,
                            "step": position.step, "epoch": position.epoch, "micro_done": position.micro_done,
                            "history": position.history}, Path(tmp) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    def _save_adapter(self, core: torch.nn.Module, tokenizer, out: Path) -> None:
        core.save_pretrained(out)
        portable_adapter_config(out, self.cfg.model.name_or_path)
        tokenizer.save_pretrained(out)
        if self.labels:
            (out / "labels.json").write_text(json.dumps(self.labels))
