"""`orchestrator train CONFIG`: QLoRA fine-tuning on Ray Train (TorchTrainer), one loop for both tasks.

The loop reads top to bottom: load the quantized base + LoRA, build optimizer and schedule, restore a
checkpoint if Ray Train hands one over, then for each optimizer step accumulate micro-batches
(without DDP gradient sync except on the last), clip, step, report, and every ``eval_every`` steps
validate and checkpoint. The task differences (collation, metrics) live in :mod:`orchestrator.tasks`.

Exact resume: a checkpoint holds the adapter (standard PEFT files), optimizer, scheduler, RNG states,
the global step and the data position (epoch, micro-batches consumed). Each rank's shard is a
deterministic split of the training set, shuffled per epoch with a seeded local buffer, so on resume
the loop skips exactly the micro-batches already consumed and no optimizer step is lost or repeated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.config import ConfigError, RunConfig, load_config
from orchestrator.flat import FlatParameters, decay_groups

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
FAULT_ENV = "ORCHESTRATOR_FAULT"  # "step=K,rank=R,mode=raise|exit": fail once, for resume tests


OPTIMIZER_FILES = "optimizer-rank*.pt"


def optimizer_file(rank: int) -> str:
    """Under ZeRO each rank checkpoints its own optimizer partition (one of OPTIMIZER_FILES)."""
    return f"optimizer-rank{rank}.pt"


# ---------------------------------------------------------------- pieces used by the loop

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def make_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter],
                   flat: FlatParameters | None = None) -> torch.optim.Optimizer:
    """AdamW over ``params`` (weight decay on matrices only); over ``flat``'s buffers where it steps flat."""
    t = cfg.train
    parts = flat.optimizer_groups(t.optimizer) if flat else decay_groups(params)
    groups = [{"params": ps, "weight_decay": t.weight_decay if decays else 0.0} for ps, decays in parts]
    if t.optimizer == "adamw_torch":
        return torch.optim.AdamW(groups, lr=t.lr)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW32bit if t.optimizer == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, lr=t.lr)


def make_scheduler(cfg: RunConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.schedule]
    warmup = int(math.ceil(cfg.train.warmup_ratio * total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def autocast(cfg: RunConfig, device: torch.device, enabled: bool = True):
    """Mixed precision per ``train.precision`` (off where the backend runs its model in the compute dtype)."""
    if cfg.train.precision == "fp32" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
class Plan:
    """How many micro-batches and optimizer steps the run has, per rank."""

    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, cfg: RunConfig, rows_per_rank: int) -> Plan:
        t = cfg.train
        micro = max(1, math.ceil(rows_per_rank / t.micro_batch_size))
        per_epoch = math.ceil(micro / t.grad_accum)
        total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))
        return cls(micro, per_epoch, total)

    def micro_in_step(self, step_in_epoch: int, grad_accum: int) -> int:
        """Micro-batches that make up optimizer step ``step_in_epoch`` (the last one may be short)."""
        return min(grad_accum, self.micro_per_epoch - step_in_epoch * grad_accum)


PLACEMENT_GROUP_FILE = ".train_placement_group"


def portable_adapter_config(adapter: Path, name_or_path: str) -> None:
    """Record the base as the config names it (hub id, ``package:`` or the user's path), not as this
    machine resolved it, so the adapter is portable."""
    f = adapter / "adapter_config.json"
    conf = json.loads(f.read_text())
    conf["base_model_name_or_path"] = name_or_path
    f.write_text(json.dumps(conf, indent=2))


def maybe_fail(spec: str | None, step: int, rank: int, run_dir: Path) -> None:
    """Fault injection for resume tests: ``step=K,rank=R,mode=raise|exit`` fails once."""
    if not spec:
        return
    f = dict(kv.split("=") for kv in spec.split(","))
    marker = run_dir / f".fault-{f['step']}-{f['rank']}"
    if step == int(f["step"]) and rank == int(f["rank"]) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("injected")
        if f.get("mode") == "exit":
            os._exit(1)
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")


# ---------------------------------------------------------------- the loop (runs on every worker)

def train_loop_per_worker(loop: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist
    from safetensors.torch import load_file

    from orchestrator.backends import graphed, make_backend, resolve
    from orchestrator.data import load_tokenizer, micro_batches
    from orchestrator.model import param_counts
    from orchestrator.profile import StepProfiler
    from orchestrator.step_graph import Staged
    from orchestrator.strategy import make_strategy
    from orchestrator.tasks import EvalAccumulator, count_real_tokens, make_task

    cfg = RunConfig.model_validate(loop["run"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(loop["run_dir"])
    seed_everything(t.seed)
    device = ray.train.torch.get_device()

    backend = make_backend(resolve(cfg, device))  # before the tokenizer: Unsloth must patch transformers first
    labels = loop.get("labels")
    model = backend.load(cfg, device, labels)
    from peft import set_peft_model_state_dict  # after the backend's load: peft imports transformers

    tokenizer = load_tokenizer(cfg.model.name_or_path)
    if rank == 0:
        print(f"training backend: {backend.name}")
        trainable, total = param_counts(model)
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    from orchestrator.tracking import Tracker

    tracker = Tracker(loop["tracking"], cfg) if rank == 0 and loop.get("tracking") else None
    step, epoch, micro_done, history, state = 0, 0, 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # adapter weights go in before DDP/DeepSpeed wraps (ZeRO-3 partitions them)
        with checkpoint.as_directory() as d:
            state = load_state(Path(d) / STATE_FILE)
            set_peft_model_state_dict(model, load_file(str(Path(d) / "adapter" / "adapter_model.safetensors")))
            if (Path(d) / optimizer_file(rank)).exists():  # ZeRO: each rank's own partition
                state["optimizer"] = load_state(Path(d) / optimizer_file(rank))
    params = [p for p in model.parameters() if p.requires_grad]
    use_graph = graphed(cfg, backend.name)
    # A graphed step's host work is mostly the optimizer's per-tensor launches: step flat buffers instead
    flat = FlatParameters(params) if use_graph else None
    optimizer = make_optimizer(cfg, params, flat)
    plan = Plan.make(cfg, loop["rows_per_rank"])
    scheduler = make_scheduler(cfg, optimizer, plan.total_steps)
    strategy = make_strategy(cfg, model, optimizer, world, device,
                             forward_module=backend.training_module(model, cfg), flat=flat)
    core = strategy.core
    step_graph = None
    if use_graph:
        from orchestrator.step_graph import GraphedStep

        step_graph = GraphedStep(core, backend.graph_forward, device, t.micro_batch_size, cfg.data.max_seq_length,
                                 flat)
        if rank == 0:
            print("training step: replayed as a CUDA graph (train.cuda_graph)")
    task = make_task(cfg.model.task, tokenizer.pad_token_id, cfg.data.packing, labels)
    group_by_length = cfg.data.group_by_length and not (cfg.model.task == "causal_lm" and cfg.data.packing)
    if state:
        strategy.load_optimizer_state(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        step, epoch, micro_done, history = state["step"], state["epoch"], state["micro_done"], state["history"]
        if rank == 0:
            print(f"resumed at step {step} (epoch {epoch}, {micro_done} micro-batches into it)")

    def evaluate() -> dict[str, float]:
        core.eval()
        acc = EvalAccumulator()
        shard, n, batch = my_shard("validation"), 0, None
        with torch.no_grad(), autocast(cfg, device, backend.autocast):
            for batch in micro_batches(shard, t.micro_batch_size, task.collate, 0, device, group_by_length):
                task.accumulate(acc, batch, backend.forward(core, task.forward_inputs(batch), train=False))
                n += 1
            if strategy.lockstep_forward:  # ZeRO-3: a forward is collective; a shorter shard repeats, unrecorded
                for _ in range(loop["val_batches_max"] - n):
                    backend.forward(core, task.forward_inputs(batch), train=False)
        core.train()
        parts = [None] * world
        if world > 1:
            dist.all_gather_object(parts, acc)
        else:
            parts = [acc]
        return task.finalize(parts)

    def save_and_report(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            with strategy.full_weights():
                if rank == 0:
                    core.save_pretrained(Path(tmp) / "adapter")
                    portable_adapter_config(Path(tmp) / "adapter", cfg.model.name_or_path)
                    tokenizer.save_pretrained(Path(tmp) / "adapter")
                    if labels:
                        (Path(tmp) / "adapter" / "labels.json").write_text(json.dumps(labels))
            rngs = [None] * world
            if world > 1:
                dist.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            if strategy.per_rank_optimizer_state:  # every rank's files merge into one checkpoint directory
                torch.save(strategy.optimizer_state(), Path(tmp) / optimizer_file(rank))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            if rank == 0:
                shared = None if strategy.per_rank_optimizer_state else strategy.optimizer_state()
                torch.save({"optimizer": shared, "scheduler": scheduler.state_dict(), "rng": rngs,
                            "step": step, "epoch": epoch, "micro_done": micro_done, "history": history},
                           Path(tmp) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    if rank == 0:  # lets a Tune study release this run's resources if it stops the trial (orchestrator.tune)
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            (run_dir / PLACEMENT_GROUP_FILE).write_text(pg.id.hex())
    def record(done: dict[str, Any]) -> None:
        """A finished step's metrics: its figures read from the device (the one host sync of a step), kept in
        the history, printed and reported; eval steps also validate and checkpoint."""
        nonlocal t_window, tok_window
        figures, ready = done.pop("figures")
        if ready is not None:  # wait for the copy alone, not for the work queued after it
            ready.synchronize()
        loss_, tokens_, norm_ = figures.tolist()
        tok_window += int(tokens_)
        now = time.perf_counter()
        tokens_total = tok_window * world
        metrics = {"step": done["step"], "epoch": done["epoch"], "loss": loss_, "lr": done["lr"],
                   "grad_norm": norm_, "tokens_per_s": tokens_total / max(now - t_window, 1e-9),
                   "real_tokens": tokens_total, "step_time_s": now - t_window, "data_wait_s": done["data_wait_s"],
                   "timestamp": time.time(), "peak_memory_mb": peak_memory_mb(device),
                   "setup_peak_memory_mb": setup_peak_mb}
        if device.type == "cuda":
            metrics["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        t_window, tok_window = now, 0
        if done["is_eval"]:
            metrics.update(evaluate())
        history.append(metrics)
        if rank == 0 and (done["step"] % t.log_every == 0 or done["is_eval"]):
            print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}))
            if tracker:
                tracker.log({**metrics, "tokens_per_s_per_gpu": metrics["tokens_per_s"] / world}, done["step"])
        if done["is_eval"]:
            save_and_report(metrics)
        elif done["step"] % t.log_every == 0:
            ray.train.report(metrics)

    train_shard = my_shard("train")
    profiler = StepProfiler(t.profile_steps, run_dir / "profile", rank == 0)
    # peak_memory_mb is the training steps' peak on a GPU (as trainers measure it), the setup's is kept apart
    setup_peak_mb = peak_memory_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_window, tok_window, wait_window = time.perf_counter(), 0, 0.0
    pending: dict[str, Any] | None = None  # the previous step, recorded once this step's work is queued
    ahead: Any = None  # the next micro-batch, fetched (and prepared for the graph) before the optimizer step
    while step < plan.total_steps:
        batches = iter(micro_batches(train_shard, t.micro_batch_size, task.collate, t.seed + epoch,
                                     "cpu" if backend.host_batches else device, group_by_length))
        for _ in range(micro_done):  # data position on resume: skip what was consumed
            next(batches)
        while micro_done < plan.micro_per_epoch and step < plan.total_steps:
            profiler.step_begins(step + 1)
            n_micro = plan.micro_in_step(micro_done // t.grad_accum, t.grad_accum)
            # The step's figures stay on the device; the host reads them once, after the next step's forward
            # and backward are queued, so the device never waits for the host's bookkeeping between steps
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            tokens, host_tokens = torch.zeros((), dtype=torch.int64, device=device), 0
            for k in range(n_micro):
                t_wait = time.perf_counter()
                batch, ahead = ahead or next(batches), None  # time blocked here: the device waits for data
                wait_window += time.perf_counter() - t_wait
                if isinstance(batch, Staged) or (step_graph and step_graph.accepts(batch)):
                    loss = step_graph.run(batch, scale=1 / n_micro) / n_micro  # one replayed CUDA graph
                    batch = batch.batch if isinstance(batch, Staged) else batch
                else:
                    batch = backend.to_device(batch, device)
                    with strategy.accumulating(last=k == n_micro - 1), autocast(cfg, device, backend.autocast):
                        out = backend.forward(strategy.model, task.forward_inputs(batch))
                        loss = out.loss / n_micro
                    strategy.backward(loss)
                loss_sum += loss.detach().double()
                real = count_real_tokens(batch)
                if real.device.type == "cpu":  # a host batch: counted on the host (a copy to the device would
                    host_tokens += int(real)  # wait for everything queued before it, this step's replay too)
                else:
                    tokens += real
            if pending:
                record(pending)
                pending = None
            micro_done += n_micro
            if step_graph and micro_done < plan.micro_per_epoch and step + 1 < plan.total_steps:
                # the next step's first micro-batch made ready while the device still runs this one's backward
                t_wait = time.perf_counter()
                ahead = next(batches)
                wait_window += time.perf_counter() - t_wait
                ahead = step_graph.prepare(ahead) if step_graph.accepts(ahead) else ahead
            grad_norm = strategy.step()  # clip, optimizer step, zero grads
            scheduler.step()
            step += 1
            profiler.step_ends(step)
            maybe_fail(loop.get("fault"), step, rank, run_dir)
            step_loss = loss_sum
            if world > 1:  # mean over ranks: one small all_reduce, not a pickled gather
                dist.all_reduce(step_loss)
                step_loss /= world
            done = {"step": step, "epoch": epoch + micro_done / plan.micro_per_epoch, "lr": scheduler.get_last_lr()[0],
                    "data_wait_s": wait_window, "is_eval": step % t.eval_every == 0 or step == plan.total_steps,
                    "figures": stage_on_host(torch.stack([
                        step_loss, tokens.double() + host_tokens,
                        torch.as_tensor(grad_norm, dtype=torch.float64, device=device)]))}
            wait_window = 0.0
            if done["is_eval"]:  # validation and the checkpoint need this step's figures now
                record(done)
            else:
                pending = done
        if micro_done >= plan.micro_per_epoch:
            epoch, micro_done = epoch + 1, 0
    if tracker:
        tracker.end()


# ---------------------------------------------------------------- driver side

def deterministic_shards(datasets: dict[str, Any], world: int) -> dict[str, Any]:
    """Split each dataset on the driver into ``world`` fixed shards named ``NAME@RANK``.

    Exact resume needs every rank to see the same rows in the same order on every run;
    streaming_split hands blocks to whichever worker asks first. Splitting here, before the
    workers take the CPUs, also keeps Ray Data's split tasks from waiting on resources."""
    out = {}
    for name, ds in datasets.items():
        if world == 1:
            parts = [ds]
        elif name == "train":  # equal shards: every rank runs the same number of steps
            parts = ds.split(world, equal=True)
        else:  # every row kept, shard sizes within one row of each other
            n = ds.count()
            parts = ds.split_at_indices([n * i // world for i in range(1, world)])
        for i, part in enumerate(parts):
            out[f"{name}@{i}"] = part
    return out


def shard_config():
    """A Ray Train DataConfig that hands rank i the shards named ``NAME@i`` (ask for ``shard_name``)."""
    from ray.train import DataConfig

    class _Shards(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kw):
            # Every rank is offered every shard (Ray Train requires each name on each rank); a rank only
            # ever asks for its own.
            return [{key: ds.iterator() for key, ds in datasets.items()} for _ in range(world_size)]

    return _Shards()


def my_shard(name: str):
    """This rank's fixed shard of ``name``. Ray Train hands out each dataset name collectively (every
    rank must ask for it), so every rank asks for every shard, in the same order, and keeps its own."""
    import ray.train

    ctx = ray.train.get_context()
    shards = [ray.train.get_dataset_shard(f"{name}@{r}") for r in range(ctx.get_world_size())]
    return shards[ctx.get_world_rank()]


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_checkpoint: str | None


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


def run_training(cfg: RunConfig, resume: bool = False, prepared=None, callbacks: list | None = None,
                 study: dict[str, Any] | None = None) -> TrainResult:
    """Fit with Ray Train and write the final adapter, metrics JSON and run report into the run dir.
    ``study``: the tracking plan of the Tune study this run is a trial of (it logs as that run's child)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.model import check_model_source
    from orchestrator.prepare import prepare_data
    from orchestrator.report import write_run_outputs

    s = cfg.scaling
    if s.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        if gpus < s.num_workers * s.gpus_per_worker:
            raise ConfigError(f"scaling.use_gpu=true needs {s.num_workers * s.gpus_per_worker:g} GPUs; "
                              f"this Ray cluster has {gpus:g}. Set scaling.use_gpu=false to train on CPUs.")
    check_model_source(cfg.model.name_or_path)
    run_dir = Path(cfg.run_dir)
    ray_dir = run_dir / "train"
    if ray_dir.exists() and not resume:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                          f"or choose another name (--set name=...)")
    if resume and not ray_dir.exists():
        raise ConfigError(f"--resume: {run_dir} holds no run to resume")
    if resume:
        check_resumable(ray_dir, cfg)
    from orchestrator import tracking

    track = tracking.plan(cfg, nodes=sum(1 for n in ray.nodes() if n.get("Alive")), parent=study)
    prepared = prepared or prepare_data(cfg)
    train_ds = prepared.datasets["train"].materialize()
    val_ds = prepared.datasets.get("validation") or prepared.datasets.get("test")
    rows = train_ds.count()
    rows_per_rank = rows // s.num_workers
    if rows_per_rank == 0:
        raise ConfigError(f"data: {rows} training rows cannot feed {s.num_workers} workers")
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    shards = deterministic_shards({"train": train_ds, "validation": val_ds.materialize()}, s.num_workers)
    val_rows = [shards[f"validation@{r}"].count() for r in range(s.num_workers)]
    if cfg.train.strategy == "deepspeed_zero3" and min(val_rows) == 0:
        raise ConfigError(f"data: {sum(val_rows)} validation rows leave a ZeRO-3 worker without any (each of the "
                          f"{s.num_workers} workers needs at least one)")
    loop = {"run": cfg.model_dump(mode="json"), "run_dir": str(run_dir), "labels": prepared.labels,
            "tracking": track,
            "rows_per_rank": rows_per_rank, "fault": os.environ.get(FAULT_ENV),
            "val_batches_max": max(math.ceil(n / cfg.train.micro_batch_size) for n in val_rows)}
    # Unsloth must import before transformers in its worker: a runtime env of their own keeps GPU workers off
    # the pool of processes that ran data tasks (and imported transformers) for this job
    worker_env = {"env_vars": {"ORCHESTRATOR_TRAIN_BACKEND": cfg.train.backend}} if s.use_gpu else None
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                     placement_strategy=s.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        datasets=shards,
        dataset_config=shard_config(),
        run_config=RayRunConfig(
            name="train", storage_path=str(run_dir), callbacks=callbacks, worker_runtime_env=worker_env,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.train.checkpoint_metric,
                                               checkpoint_score_order=cfg.train.checkpoint_mode)))
    from orchestrator.runtime import console

    with console.progress(f"train {cfg.name}", Plan.make(cfg, rows_per_rank).total_steps):
        result = trainer.fit()
    if result.error:
        raise result.error
    latest = result.checkpoint
    if latest is None:
        raise RuntimeError(f"{run_dir}: training reported no checkpoint")
    best = result.get_best_checkpoint(cfg.train.checkpoint_metric, cfg.train.checkpoint_mode) or latest
    with latest.as_directory() as d:
        history = load_state(Path(d) / STATE_FILE)["history"]
    with best.as_directory() as d:
        adapter_dir = run_dir / "adapter"
        from orchestrator.io import atomic_dir

        with atomic_dir(adapter_dir) as tmp:
            shutil.copytree(Path(d) / "adapter", tmp, dirs_exist_ok=True)
    final = history[-1]
    write_run_outputs(cfg, run_dir, history, best_path=best.path)
    from orchestrator.card import write_card

    write_card(cfg, "adapter", adapter_dir)
    tracking.log_to_run(run_dir, artifacts=[adapter_dir / "README.md", run_dir / "report.md",
                                            run_dir / "metrics.json"], job="train")
    return TrainResult(run_dir, adapter_dir, final, history, best.path)


def run_train(config: str | Path, overrides: list[str] | None = None, resume: str | None = None) -> TrainResult:
    """Entry for `orchestrator train` and jobs/train.py."""
    from orchestrator.model import ensure_model
    from orchestrator.runtime import init_ray

    cfg = load_config(config, overrides)
    if resume:
        resume_dir = Path(resume).resolve()
        cfg.output_dir, cfg.name = str(resume_dir.parent), resume_dir.name
    ensure_model(cfg)  # built on first use, or a one-line error, before Ray starts
    init_ray(log_file=cfg.run_dir / "ray.log")
    result = run_training(cfg, resume=bool(resume))
    print(f"adapter: {result.adapter_dir}\nmetrics: {result.run_dir / 'metrics.json'}\n"
          f"report:  {result.run_dir / 'report.md'}")
    from orchestrator.tracking import where_to_look

    for line in where_to_look(result.run_dir):
        print(line)
    return result
