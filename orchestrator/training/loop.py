"""The training recipe every Ray Train worker runs, one loop for both tasks: set up, restore, then the steps.

Set-up loads the quantized base + LoRA through the run's backend, builds the optimizer, schedule and
strategy (DDP or DeepSpeed ZeRO), and, where it can run, the CUDA-graphed step. Restore takes what the
checkpoint Ray Train hands over (:mod:`orchestrator.training.checkpoint`). Each optimizer step accumulates
micro-batches (no DDP gradient sync except on the last), clips and steps; its figures stay on the device and
are read once, after the next step's work is queued (:mod:`orchestrator.training.recorder`); every
``eval_every`` steps the worker validates and checkpoints. Task differences (collation, metrics) live in
:mod:`orchestrator.training.tasks`, backend differences in :mod:`orchestrator.training.backends`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.core.config import RunConfig
from orchestrator.training.checkpoint import Checkpointer, Position
from orchestrator.training.flat_params import FlatParameters, decay_groups
from orchestrator.training.recorder import StepDone, StepRecorder, stage_on_host

PLACEMENT_GROUP_FILE = ".train_placement_group"


@dataclass
class WorkerJob:
    """What the driver hands every worker (as Ray Train's ``train_loop_config``, a dict of these fields)."""

    run: dict[str, Any]  # the run config, as JSON
    run_dir: str
    rows_per_rank: int
    val_batches_max: int  # the most validation micro-batches of any rank (ZeRO-3 forwards run in lockstep)
    labels: list[str] | None = None
    tracking: dict[str, Any] | None = None
    fault: str | None = None  # "step=K,rank=R,mode=raise|exit": fail once, for resume tests


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


# ---------------------------------------------------------------- small pieces

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def my_shard(name: str):
    """This rank's fixed shard of ``name``. Ray Train hands out each dataset name collectively (every
    rank must ask for it), so every rank asks for every shard, in the same order, and keeps its own."""
    import ray.train

    ctx = ray.train.get_context()
    shards = [ray.train.get_dataset_shard(f"{name}@{r}") for r in range(ctx.get_world_size())]
    return shards[ctx.get_world_rank()]


# ---------------------------------------------------------------- set-up

@dataclass
class Worker:
    """One worker's training set-up: the model under its strategy, optimizer, schedule, task and data plan."""

    cfg: RunConfig
    job: WorkerJob
    rank: int
    world: int
    device: torch.device
    backend: Any
    tokenizer: Any
    strategy: Any
    scheduler: Any
    plan: Plan
    task: Any
    step_graph: Any  # GraphedStep | None
    group_by_length: bool
    checkpointer: Checkpointer

    @property
    def core(self) -> torch.nn.Module:
        """The model as its strategy holds it (the module that saves the adapter)."""
        return self.strategy.core


def set_up(job: WorkerJob) -> tuple[Worker, dict[str, Any] | None]:
    """The worker's model, optimizer, schedule, strategy and task; and the checkpoint's state (its adapter weights
    already loaded) when Ray Train handed one over."""
    import ray.train

    from orchestrator.data.tokenization import load_tokenizer
    from orchestrator.training.backends import graphed, make_backend, resolve
    from orchestrator.training.model import param_counts
    from orchestrator.training.strategy import make_strategy
    from orchestrator.training.tasks import make_task

    cfg = RunConfig.model_validate(job.run)
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(t.seed)
    device = ray.train.torch.get_device()
    backend = make_backend(resolve(cfg, device))  # before the tokenizer: Unsloth must patch transformers first
    model = backend.load(cfg, device, job.labels)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    if rank == 0:
        trainable, total = param_counts(model)
        print(f"training backend: {backend.name}\ntrainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / total:.4f}")
    checkpointer = Checkpointer(cfg, rank, world, job.labels)
    state = checkpointer.load_weights(model)  # adapter weights go in before DDP/DeepSpeed wraps
    params = [p for p in model.parameters() if p.requires_grad]
    use_graph = graphed(cfg, backend.name)
    # A graphed step's host work is mostly the optimizer's per-tensor launches: step flat buffers instead
    flat = FlatParameters(params) if use_graph else None
    optimizer = make_optimizer(cfg, params, flat)
    plan = Plan.make(cfg, job.rows_per_rank)
    scheduler = make_scheduler(cfg, optimizer, plan.total_steps)
    strategy = make_strategy(cfg, model, optimizer, world, device,
                             forward_module=backend.training_module(model, cfg), flat=flat)
    step_graph = None
    if use_graph:
        from orchestrator.training.step_graph import GraphedStep

        step_graph = GraphedStep(strategy.core, backend.graph_forward, device, t.micro_batch_size,
                                 cfg.data.max_seq_length, flat)
        if rank == 0:
            print("training step: replayed as a CUDA graph (train.cuda_graph)")
    task = make_task(cfg.model.task, tokenizer.pad_token_id, cfg.data.packing, job.labels)
    group_by_length = cfg.data.group_by_length and not (cfg.model.task == "causal_lm" and cfg.data.packing)
    worker = Worker(cfg, job, rank, world, device, backend, tokenizer, strategy, scheduler, plan, task, step_graph,
                    group_by_length, checkpointer)
    return worker, state


def validate(w: Worker) -> dict[str, float]:
    """The validation metrics of every rank's shard, merged (every rank gets them)."""
    import torch.distributed as dist

    from orchestrator.data.pipelines import micro_batches
    from orchestrator.training.tasks import EvalAccumulator

    core, t = w.core, w.cfg.train
    core.eval()
    acc, n, batch = EvalAccumulator(), 0, None
    with torch.no_grad(), autocast(w.cfg, w.device, w.backend.autocast):
        for batch in micro_batches(my_shard("validation"), t.micro_batch_size, w.task.collate, 0, w.device,
                                   w.group_by_length):
            w.task.accumulate(acc, batch, w.backend.forward(core, w.task.forward_inputs(batch), train=False))
            n += 1
        if w.strategy.lockstep_forward:  # ZeRO-3: a forward is collective; a shorter shard repeats, unrecorded
            for _ in range(w.job.val_batches_max - n):
                w.backend.forward(core, w.task.forward_inputs(batch), train=False)
    core.train()
    parts = [None] * w.world
    if w.world > 1:
        dist.all_gather_object(parts, acc)
    else:
        parts = [acc]
    return w.task.finalize(parts)


# ---------------------------------------------------------------- the steps

def accumulate(w: Worker, batches, n_micro: int, ahead: Any) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """One optimizer step's micro-batches forward and backward (the first may be ``ahead``, fetched earlier):
    the summed loss and real tokens stay on the device (host-counted tokens apart), and the time spent
    waiting for data."""
    from orchestrator.training.step_graph import Staged
    from orchestrator.training.tasks import count_real_tokens

    device, strategy, step_graph = w.device, w.strategy, w.step_graph
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens, host_tokens, wait = torch.zeros((), dtype=torch.int64, device=device), 0, 0.0
    for k in range(n_micro):
        t_wait = time.perf_counter()
        batch, ahead = ahead or next(batches), None  # time blocked here: the device waits for data
        wait += time.perf_counter() - t_wait
        if isinstance(batch, Staged) or (step_graph and step_graph.accepts(batch)):
            loss = step_graph.run(batch, scale=1 / n_micro) / n_micro  # one replayed CUDA graph
            batch = batch.batch if isinstance(batch, Staged) else batch
        else:
            batch = w.backend.to_device(batch, device)
            with strategy.accumulating(last=k == n_micro - 1), autocast(w.cfg, device, w.backend.autocast):
                out = w.backend.forward(strategy.model, w.task.forward_inputs(batch))
                loss = out.loss / n_micro
            strategy.backward(loss)
        loss_sum += loss.detach().double()
        real = count_real_tokens(batch)
        if real.device.type == "cpu":  # a host batch: counted on the host (a copy to the device would
            host_tokens += int(real)  # wait for everything queued before it, this step's replay too)
        else:
            tokens += real
    return loss_sum, tokens, host_tokens, wait


def run_steps(w: Worker, pos: Position, recorder: StepRecorder) -> None:
    """Optimizer steps until the plan's total, epoch after epoch, from ``pos`` (which the loop advances). A
    step's figures are recorded after the next step's work is queued, so the device never waits for the
    host's bookkeeping between steps; eval steps are recorded at once (validation needs them)."""
    from orchestrator.data.pipelines import micro_batches
    from orchestrator.training.profile import StepProfiler

    t, plan, step_graph = w.cfg.train, w.plan, w.step_graph
    train_shard = my_shard("train")
    profiler = StepProfiler(t.profile_steps, Path(w.job.run_dir) / "profile", w.rank == 0)
    recorder.start()
    pending: StepDone | None = None
    ahead: Any = None  # the next micro-batch, fetched (and prepared for the graph) before the optimizer step
    wait = 0.0
    while pos.step < plan.total_steps:
        batches = iter(micro_batches(train_shard, t.micro_batch_size, w.task.collate, t.seed + pos.epoch,
                                     "cpu" if w.backend.host_batches else w.device, w.group_by_length))
        for _ in range(pos.micro_done):  # data position on resume: skip what was consumed
            next(batches)
        while pos.micro_done < plan.micro_per_epoch and pos.step < plan.total_steps:
            profiler.step_begins(pos.step + 1)
            n_micro = plan.micro_in_step(pos.micro_done // t.grad_accum, t.grad_accum)
            loss_sum, tokens, host_tokens, waited = accumulate(w, batches, n_micro, ahead)
            wait, ahead = wait + waited, None
            if pending:
                recorder.record(pending)
                pending = None
            pos.micro_done += n_micro
            if step_graph and pos.micro_done < plan.micro_per_epoch and pos.step + 1 < plan.total_steps:
                # the next step's first micro-batch made ready while the device still runs this one's backward
                t_wait = time.perf_counter()
                ahead = next(batches)
                wait += time.perf_counter() - t_wait
                ahead = step_graph.prepare(ahead) if step_graph.accepts(ahead) else ahead
            done = finish_step(w, pos, loss_sum, tokens, host_tokens, wait)
            profiler.step_ends(pos.step)
            wait = 0.0
            if done.is_eval:  # validation and the checkpoint need this step's figures now
                recorder.record(done)
            else:
                pending = done
        if pos.micro_done >= plan.micro_per_epoch:
            pos.epoch, pos.micro_done = pos.epoch + 1, 0


def finish_step(w: Worker, pos: Position, loss_sum: torch.Tensor, tokens: torch.Tensor, host_tokens: int,
                wait: float) -> StepDone:
    """Clip, optimizer step, zero grads, schedule; the step's figures (mean loss over ranks, tokens, grad norm)
    staged for the host."""
    import torch.distributed as dist

    grad_norm = w.strategy.step()  # clip, optimizer step, zero grads
    w.scheduler.step()
    pos.step += 1
    maybe_fail(w.job.fault, pos.step, w.rank, Path(w.job.run_dir))
    if w.world > 1:  # mean over ranks: one small all_reduce, not a pickled gather
        dist.all_reduce(loss_sum)
        loss_sum /= w.world
    t = w.cfg.train
    figures = torch.stack([loss_sum, tokens.double() + host_tokens,
                           torch.as_tensor(grad_norm, dtype=torch.float64, device=w.device)])
    return StepDone(pos.step, pos.epoch + pos.micro_done / w.plan.micro_per_epoch, w.scheduler.get_last_lr()[0],
                    wait, pos.step % t.eval_every == 0 or pos.step == w.plan.total_steps, stage_on_host(figures))


# ---------------------------------------------------------------- the recipe

def _about(w: Worker) -> dict[str, Any]:
    """The device and the model FLOPs per token, for the run's cost report (MFU)."""
    from orchestrator.training.model import flops_per_token

    name = torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else "cpu"
    return {"device_name": name, "flops_per_token": flops_per_token(w.core, w.cfg.data.max_seq_length)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function: set up, restore, run the steps, close the tracker."""
    import ray.util

    started = time.perf_counter()
    job = WorkerJob(**config)
    w, state = set_up(job)
    pos = w.checkpointer.resume(state, w.strategy, w.scheduler)
    tracker = None
    if w.rank == 0:
        if job.tracking:
            from orchestrator.core.tracking import Tracker

            tracker = Tracker(job.tracking, w.cfg)
        # lets a Tune study release this run's resources if it stops the trial (orchestrator.tuning.tune)
        if (pg := ray.util.get_current_placement_group()) is not None:
            (Path(job.run_dir) / PLACEMENT_GROUP_FILE).write_text(pg.id.hex())
    recorder = StepRecorder(
        w.rank, w.world, w.device, w.cfg.train.log_every, pos.history, validate=lambda: validate(w),
        checkpoint=lambda metrics: w.checkpointer.save(metrics, pos, w.strategy, w.scheduler, w.tokenizer),
        tracker=tracker, started=started, about=_about(w))
    run_steps(w, pos, recorder)
    if tracker:
        tracker.end()
