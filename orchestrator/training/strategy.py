"""How Ray Train workers share an optimizer step: DDP, or DeepSpeed ZeRO-2/3 (``train.strategy``).

The training loop calls the same few methods whichever is chosen:

    with strategy.accumulating(last):        # per micro-batch; gradient sync only on the last one
        loss = strategy.model(**inputs).loss
    strategy.backward(loss)
    grad_norm = strategy.step()              # clip, optimizer step, zero grads
    with strategy.full_weights():            # ZeRO-3: gather the partitioned LoRA weights to save them
        ...

DDP keeps a whole optimizer on every rank (rank 0's state is the checkpoint's). ZeRO-2 partitions the
optimizer state and the gradients of the trainable (LoRA) parameters across ranks; ZeRO-3 also partitions
the parameters themselves, the frozen 4-bit base included, which is why 4-bit + ZeRO-3 needs
``quantization.quant_storage`` equal to the compute dtype (the packed weights then travel in all-gathers
as ordinary tensors). Under ZeRO each rank checkpoints its own optimizer partition.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from orchestrator.core.config import RunConfig
from orchestrator.training.flat_params import FlatParameters


class DDPStrategy:
    """Plain data parallel (torch DDP through Ray Train); one process per device."""

    per_rank_optimizer_state = False
    lockstep_forward = False  # True where every forward pass is a collective (ZeRO-3's parameter all-gathers)

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: int,
                 device: torch.device, forward_module: torch.nn.Module | None = None,
                 flat: FlatParameters | None = None):
        import ray.train.torch

        self.cfg, self.core, self.optimizer, self.world, self.flat = cfg, model, optimizer, world, flat
        self.model = forward_module or model
        # A CUDA-graphed step (train.cuda_graph, with flat parameters) runs the bare model; its gradients are
        # all-reduced in step()
        self.reduce_in_step = world > 1 and flat is not None
        if world > 1 and not self.reduce_in_step:
            self.model = ray.train.torch.prepare_model(self.model, move_to_device=False,
                                                       parallel_strategy_kwargs={"find_unused_parameters": False})
        self.params = [p for p in model.parameters() if p.requires_grad]
        fp16 = cfg.train.precision == "fp16" and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None

    def accumulating(self, last: bool):
        """No DDP gradient all-reduce on accumulation micro-batches, only on the step's last one."""
        return contextlib.nullcontext() if last or self.world == 1 or self.reduce_in_step else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> torch.Tensor | float:
        """Clip, step, zero grads; returns the gradient norm (a device tensor where the backend leaves one, so
        the loop reads it with the step's other figures in one sync)."""
        if self.reduce_in_step:
            all_reduce_mean(self.flat.grads, self.world)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clipped = self.flat.flats if self.flat else self.params  # one norm per flat buffer
        norm = torch.nn.utils.clip_grad_norm_(clipped, self.cfg.train.max_grad_norm or float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.flat:
            self.flat.zero_grad()  # the gradients stay views of the flat buffers
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def optimizer_state(self) -> dict[str, Any]:
        return self.flat.state_dict(self.optimizer) if self.flat else self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if self.flat:
            self.flat.load_state_dict(self.optimizer, state)
        else:
            self.optimizer.load_state_dict(state)

    def full_weights(self):
        return contextlib.nullcontext()


def all_reduce_mean(grads: list[torch.Tensor], world: int) -> None:
    """Average (flat) gradient buffers over the workers, in place."""
    import torch.distributed as dist

    for g in grads:
        dist.all_reduce(g)
        g /= world


class DeepSpeedStrategy(DDPStrategy):
    """DeepSpeed ZeRO stage 2 or 3 around the same peft model and (paged) optimizer.

    The loop owns gradient accumulation (``managed_gradient_accumulation: false``): every micro-batch's
    backward goes through the engine (ZeRO reduces and partitions gradients as they are produced) and the
    loop calls ``step()`` once per optimizer step, so a short last step of an epoch needs no special case.
    Mixed precision stays the loop's torch autocast, as with DDP: the LoRA weights and the optimizer are fp32.
    """

    per_rank_optimizer_state = True

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: int,
                 device: torch.device, forward_module: torch.nn.Module | None = None):
        import deepspeed

        if device.type == "cpu":
            # DeepSpeed compiles a shared-memory all-reduce for CPU *inference* when its comm backend starts;
            # training collectives go through gloo, so skip that compile (and its need for a C++ toolchain).
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.cfg, self.core, self.world, self.flat = cfg, model, world, None
        self.stage = 3 if cfg.train.strategy == "deepspeed_zero3" else 2
        self.lockstep_forward = self.stage == 3
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=forward_module or model, optimizer=optimizer, config=deepspeed_config(cfg, world), dist_init_required=False)
        self.model = self.engine
        self.scaler = None

    def accumulating(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divides by the micro-batch count

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()  # this rank's partition

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        # One entry per data-parallel rank is expected; ZeRO reads only this rank's. The fp32 master
        # partition comes from the checkpoint too, so the restored weights are bit-identical.
        self.optimizer.load_state_dict([state] * self.world, load_optimizer_states=True,
                                       load_from_fp32_weights=True)

    def full_weights(self):
        """Under ZeRO-3 the LoRA weights are partitioned: gather them (every rank must enter)."""
        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        # An eval pass leaves weights that ZeRO-3 prefetched on the way (its trace is the training step's)
        # in flight; let them land and re-partition before gathering.
        self.engine.empty_partition_cache()
        return deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)


def deepspeed_config(cfg: RunConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config for a run: ZeRO stage from ``train.strategy``, batch sizes and clipping from
    ``train``; the client (paged) optimizer is kept, which ZeRO calls untested but supports."""
    t = cfg.train
    # Buckets sized for LoRA: DeepSpeed's defaults (5e8 elements) are made for full fine-tuning and would
    # allocate GBs of fp32 bucket buffers for ~40M trainable parameters (measured: +3.5 GB on a 7B model).
    zero: dict[str, Any] = {"stage": 3 if t.strategy == "deepspeed_zero3" else 2, "overlap_comm": True,
                            "contiguous_gradients": True, "reduce_bucket_size": 2e7, "allgather_bucket_size": 2e7}
    if zero["stage"] == 3:
        # Weights above the persistence threshold (the packed 4-bit base matrices) stay partitioned between
        # uses and are prefetched ahead of the layer that needs them; small ones (LoRA A/B, norms) persist.
        zero.update({"stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5})
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world,
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def make_strategy(cfg: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: int,
                  device: torch.device, forward_module: torch.nn.Module | None = None,
                  flat: FlatParameters | None = None) -> DDPStrategy:
    """``model`` is what is saved and evaluated; ``forward_module`` (default: the model) what training
    forwards go through, e.g. the chunked-loss wrapper of :mod:`orchestrator.training.loss`; ``flat``: the trainable
    parameters' flat buffers of CUDA-graphed steps (DDP only), whose gradients the strategy all-reduces itself."""
    if cfg.train.strategy == "ddp":
        return DDPStrategy(cfg, model, optimizer, world, device, forward_module, flat)
    return DeepSpeedStrategy(cfg, model, optimizer, world, device, forward_module)
