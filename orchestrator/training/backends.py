"""Training backends (``train.backend``): how a Ray Train worker builds the trainable model and calls it.

One training loop runs them all; a backend differs only in two small pieces, ``load`` (base + LoRA, ready to
train) and ``forward`` (one call of the model on a batch from the task's collate).

- ``hf``: transformers + peft + bitsandbytes. Every device, task and strategy.
- ``liger``: the same, with Liger Kernel's Triton RMSNorm, RoPE, SwiGLU and fused linear cross-entropy
  patched into transformers' classes for the model's architecture (CUDA; ``pip install '.[liger]'``).
- ``unsloth``: Unsloth's model: fused 4-bit LoRA autograd functions, Triton kernels, its offloaded gradient
  checkpointing and chunked cross-entropy (CUDA, causal LM, DDP; ``pip install '.[unsloth]'``). Importing
  Unsloth patches transformers for the whole process, so the worker imports it before transformers, and
  only GPU workers that use it ever do (the driver, the CPU path and other backends never import it).
  Packed rows go to it as one row with restarting ``position_ids``, from which it builds the per-example
  (block-diagonal) attention; logits come back in the batch's shape.
- ``auto`` (the default): ``unsloth`` where it can run and is installed, else ``hf``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from typing import Any

import torch

from orchestrator.core.config import ConfigError, RunConfig, graph_unsupported, unsupported

log = logging.getLogger(__name__)

def graphed(cfg: RunConfig, backend: str) -> bool:
    """Whether a worker running ``backend`` replays CUDA-graphed steps: ``train.cuda_graph`` unset means wherever
    it can run (the unsloth backend and a config it fits); true was checked before Ray started."""
    if cfg.train.cuda_graph is False:
        return False
    if cfg.train.cuda_graph and backend != "unsloth":
        raise ConfigError(f"train.cuda_graph replays Unsloth's model, but this worker runs the {backend} backend "
                          "(train.backend=auto found no Unsloth here: pip install '.[unsloth]')")
    return backend == "unsloth" and graph_unsupported(cfg) is None


_MODULE = {"liger": "liger_kernel", "unsloth": "unsloth"}
LOSS_CHUNK = 512  # tokens per chunk of a CUDA-graphed step's loss (fp32 logits of 512 x vocab at a time)


def installed(backend: str) -> bool:
    return backend == "hf" or importlib.util.find_spec(_MODULE[backend]) is not None


def resolve(cfg: RunConfig, device: torch.device) -> str:
    """The backend this worker runs: ``auto`` picks unsloth on a GPU where it can run and is installed (and
    nothing in this process imported transformers before it), else hf."""
    b = cfg.train.backend
    if b == "auto":
        fast = (device.type == "cuda" and unsupported(cfg, "unsloth") is None and installed("unsloth")
                and "transformers" not in sys.modules)
        return "unsloth" if fast else "hf"
    if b != "hf" and device.type != "cuda":
        raise ConfigError(f"train.backend={b}: this worker has no CUDA device")
    if not installed(b):
        raise ConfigError(f"train.backend={b}: {_MODULE[b]} is not installed in the workers' environment "
                          f"(pip install '.[{b}]')")
    return b


class Backend:
    """transformers + peft (``hf``): the reference every other backend is checked against."""

    name = "hf"
    autocast = True  # the loop's mixed precision (prepare_model_for_kbit_training leaves fp32 layers)
    host_batches = False  # True: the loop receives training batches on the host and calls to_device

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """A training batch on ``device`` (Ray Data already moved it unless ``host_batches``)."""
        return batch

    def load(self, cfg: RunConfig, device: torch.device, labels: list[str] | None) -> torch.nn.Module:
        from orchestrator.training.model import load_for_training

        return load_for_training(cfg, device, labels)

    def forward(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor], train: bool = True) -> Any:
        return module(**inputs)

    def training_module(self, model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        from orchestrator.training.loss import training_module

        return training_module(model, cfg.model.task, cfg.train.loss_chunk_tokens)

    graph_forward = None  # a backend whose packed step can be captured as a CUDA graph defines it (step_graph.py)


class LigerBackend(Backend):
    """``hf`` with Liger Kernel's Triton modules patched into the architecture's classes before loading."""

    name = "liger"

    def load(self, cfg, device, labels):
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel
        from transformers import AutoConfig

        from orchestrator.core.sources import check_model_source

        conf = AutoConfig.from_pretrained(check_model_source(cfg.model.name_or_path),
                                          trust_remote_code=cfg.model.trust_remote_code)
        causal = cfg.model.task == "causal_lm"
        _apply_liger_kernel(conf.model_type, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                            fused_linear_cross_entropy=causal)
        return super().load(cfg, device, labels)

    def training_module(self, model, cfg):
        return model  # the fused linear cross-entropy already never materialises the logits


class UnslothBackend(Backend):
    """Unsloth's fast model (imported here, in the GPU worker, before anything imports transformers)."""

    name = "unsloth"
    autocast = False  # the model runs in the compute dtype and its kernels cast themselves, as Unsloth's
    # examples run it; autocast only added casts (a 4 x 512 step 0.235 -> 0.219 s on an H100)
    host_batches = True  # packed rows' example lengths are read on the host, before the batch moves

    def to_device(self, batch, device):
        """Packed rows also get ``packed_seq_lengths`` (every example's length, in row order, a host tensor):
        given it, Unsloth stages the lengths through pinned memory instead of reading them back from the
        device, a host sync per micro-batch that would stall the queue of launched work."""
        out = {k: v.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else v.to(device)
               for k, v in batch.items()}
        if "position_ids" in batch and "attention_mask" not in batch:
            from orchestrator.training.step_graph import example_lengths

            out["packed_seq_lengths"] = example_lengths(batch["position_ids"]).to(torch.int32)
        return out

    def load(self, cfg, device, labels):
        if "transformers" in sys.modules and "unsloth" not in sys.modules:
            raise ConfigError("train.backend=unsloth: transformers was imported in this worker before Unsloth "
                              "could patch it; use train.backend=hf or a fresh worker process")
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        import unsloth  # noqa: F401  (patches transformers: must come first)
        from unsloth import FastLanguageModel

        if cfg.data.packing and flash_varlen_for_packed_rows():
            log.info("packed rows: one flash-attention varlen call per layer (torch %s)", torch.__version__)
        if cfg.data.packing:
            packed_lengths_without_sync()

        from orchestrator.core.sources import check_model_source
        from orchestrator.training.model import DTYPES, bnb_config

        q, t = cfg.quantization, cfg.train
        kwargs: dict[str, Any] = {}
        if q.bits == 4:
            kwargs["quantization_config"] = bnb_config(cfg)
        # Unsloth's offloaded checkpointing stages activations through host buffers it picks per call, which a
        # CUDA graph cannot replay: a captured step offloads through fixed buffers (step_graph.ActivationOffload)
        graph = graphed(cfg, self.name)
        unsloth_offload = t.gradient_checkpointing and not graph
        model, _ = FastLanguageModel.from_pretrained(
            model_name=check_model_source(cfg.model.name_or_path),
            max_seq_length=cfg.data.max_seq_length * (t.micro_batch_size if cfg.data.packing else 1),
            dtype=DTYPES[q.compute_dtype], load_in_4bit=q.bits == 4, device_map={"": device},
            trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
            use_gradient_checkpointing="unsloth" if unsloth_offload else False, random_state=t.seed, **kwargs)
        lc = cfg.lora
        model = FastLanguageModel.get_peft_model(
            model, r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
            target_modules=linear_names(model) if lc.target_modules == "all-linear" else lc.target_modules,
            modules_to_save=lc.modules_to_save or None,
            use_gradient_checkpointing="unsloth" if unsloth_offload else False, random_state=t.seed)
        if graph and t.gradient_checkpointing:
            from orchestrator.training.step_graph import ActivationOffload

            inner = model.base_model.model
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            self.offload = ActivationOffload(device)
            if skip_mlp_output_in_recompute():
                log.info("checkpointed layers skip the MLP's down projection when recomputed for the backward")
            if stash_attention_in_recompute():
                log.info("checkpointed layers keep flash attention's output for their recomputation")
            for module in inner.modules():
                if hasattr(module, "_gradient_checkpointing_func"):
                    module._gradient_checkpointing_func = self.offload.checkpoint
            model.enable_input_require_grads()  # the first layer's checkpoint needs an input that wants a grad
        model.config.use_cache = False
        model.train()
        return model

    offload = None  # train.cuda_graph's activation offload (step_graph.ActivationOffload), counting layers per pass

    def forward(self, module, inputs, train=True):
        if self.offload:
            self.offload.begin()
        shape = inputs["input_ids"].shape
        packed = "position_ids" in inputs and "attention_mask" not in inputs
        if packed:  # one row; Unsloth takes the examples' boundaries from packed_seq_lengths when given, else
            # infers them from the restarting position_ids
            inputs = {k: v if k == "packed_seq_lengths" else v.reshape(1, -1) for k, v in inputs.items()}
        if not train:  # without labels Unsloth returns the logits (the task's metrics need them)
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
        out = module(**inputs)
        if packed and not train:  # (in training Unsloth leaves the logits unmaterialised)
            out.logits = out.logits.reshape(*shape, -1)
        return out

    def training_module(self, model, cfg):
        return model  # Unsloth computes its chunked cross-entropy itself

    def graph_forward(self, module, inputs, lengths, cu_seqlens, longest):
        """A flattened packed row's loss with its example boundaries as device tables (CUDA-graph safe): Unsloth's
        per-device caches of packed metadata are seeded with them, so no layer reads lengths on the host; flash
        attention is told ``longest`` as the bound on an example's length, and zero-length examples are no-ops
        for it."""
        from unsloth.utils import packing

        from orchestrator.training.step_graph import ChunkedCrossEntropy

        dev = lengths.device
        if self.offload:
            self.offload.begin()
        packing._PACKED_INFO_CACHE[dev] = {"seq_lengths": lengths, "result": (lengths, cu_seqlens, longest),
                                           "inference": False}
        packing._PADDED_CU_SEQLENS_CACHE[dev] = {"cu_seqlens": cu_seqlens, "total": inputs["input_ids"].numel(),
                                                 "result": (cu_seqlens, longest), "inference": False}
        labels = packing.mask_packed_boundary_labels(inputs["labels"], lengths)  # each example's first label
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        causal = module.base_model.model
        if getattr(causal.config, "final_logit_softcapping", None) or getattr(causal.config, "logit_scale", None):
            # logits transformed after the head: Unsloth's Triton cross-entropy over the full logits applies them
            from unsloth.kernels.cross_entropy_loss import fast_cross_entropy_loss

            logits = module(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                            packed_seq_lengths=lengths).logits
            return fast_cross_entropy_loss(logits, shifted)
        # Unsloth's fused loss selects the labelled tokens (a data-dependent shape): the decoder's hidden states
        # through the head and the loss in fixed chunks instead, never the full logits
        hidden = causal.model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                              packed_seq_lengths=lengths).last_hidden_state
        return ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), causal.lm_head.weight,
                                         shifted.reshape(-1), LOSS_CHUNK)


def flash_varlen_for_packed_rows() -> bool:
    """Packed rows in one flash-attention call per layer on torches without ``varlen_attn(enable_gqa=...)``.

    Unsloth sends packed rows through torch's flash varlen kernel only from torch 2.12 (whose ``varlen_attn``
    takes ``enable_gqa``); before that it runs one SDPA call per run of equal segment lengths, which made a
    packed 4 x 512 step 2.2x slower than an unpacked one on an H100 (bench/backend_check.py time). The flash
    varlen kernel itself is in torch 2.11 (``aten._flash_attention_forward`` with cumulative lengths); this
    hands Unsloth a ``varlen_attn`` built on it (grouped K/V expanded to the query heads). No-op where Unsloth
    already has one, flash attention is missing, or Unsloth's dispatch module differs from the pinned one.
    """
    try:
        from unsloth.utils import attention_dispatch as ad
    except ImportError:
        return False
    if getattr(ad, "_TORCH_VARLEN_ATTN", True) is not None or not hasattr(ad, "_LeanFlashVarlen"):
        return False
    if not torch.backends.cuda.is_flash_attention_available():
        return False

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        if enable_gqa and k.shape[1] != q.shape[1]:  # (tokens, heads, dim)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        left, right = window_size
        return ad._LeanFlashVarlen.apply(q, k, v, cu_q, max_q, (left, right) == (-1, 0), scale, left, right)

    ad._TORCH_VARLEN_ATTN = varlen_attn
    ad._LEAN_VARLEN = True
    ad._varlen_can_use_cudnn = lambda *args, **kwargs: False
    return True


def stash_attention_in_recompute() -> bool:
    """Flash attention's output and log-sum-exp from a checkpointed layer's first run, kept for its
    recomputation (on the host meanwhile, ``step_graph.ActivationOffload.attach``), so that the recomputation
    skips the attention forward; the backward is Unsloth's own flash-attention backward, reading what it always
    reads. Runs outside a checkpointed layer (evaluation, eager steps without ``train.cuda_graph``) are
    unchanged. No-op where Unsloth's flash varlen function differs from the pinned one."""
    import inspect

    try:
        from unsloth.utils import attention_dispatch as ad
    except ImportError:
        return False
    original = getattr(ad, "_LeanFlashVarlen", None)
    names = ["ctx", "query", "key", "value", "cu_seqlens", "max_seqlen", "is_causal", "scale", "window_left",
             "window_right"]
    if original is None or getattr(original, "_stashes", False) \
            or list(inspect.signature(original.forward).parameters) != names:
        return False
    from orchestrator.training.step_graph import Recompute

    class StashedFlashVarlen(original):
        _stashes = True

        @staticmethod
        def forward(ctx, query, key, value, cu_seqlens, max_seqlen, is_causal, scale, window_left, window_right):
            offload = Recompute.offload
            if offload is None:
                return original.forward(ctx, query, key, value, cu_seqlens, max_seqlen, is_causal, scale,
                                        window_left, window_right)
            if Recompute.active:
                out, lse = offload.take(), offload.take()
                seed, offset = offload.philox[offload.current]
            else:
                out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
                    query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, is_causal,
                    return_debug_mask=False, scale=scale, window_size_left=window_left,
                    window_size_right=window_right)
                offload.attach(out)
                offload.attach(lse)
                offload.philox[offload.current] = (seed, offset)  # unused without dropout; kept as Unsloth does
            ctx.save_for_backward(query, key, value, cu_seqlens, out, lse, seed, offset)
            ctx.max_seqlen, ctx.is_causal, ctx.scale = max_seqlen, is_causal, scale
            ctx.window = (window_left, window_right)
            return out

    ad._LeanFlashVarlen = StashedFlashVarlen
    return True


def skip_mlp_output_in_recompute() -> bool:
    """A checkpointed layer is run again in the backward only to rebuild what its backward reads. Its last
    operation, the MLP's down projection (a fifth of the layer's matmul work), feeds nothing but the layer's
    output, whose value that backward never reads: its gradient arrives from the layer above. So while a layer
    is recomputed (``step_graph.Recompute``) Unsloth's fused LoRA MLP computes and saves the gate and up
    projections as it always does, skips the down projection and returns an unfilled tensor of the output's
    shape; its backward is Unsloth's own and reads only what was saved. Anything but the plain (no dropout, no
    bias) MLP runs Unsloth's forward unchanged. No-op where Unsloth's fused MLP differs from the pinned one."""
    import inspect

    try:
        from unsloth.kernels import fast_lora as fl
    except ImportError:
        return False
    original = getattr(fl, "LoRA_MLP", None)
    names = ["ctx", "X", "gateW", "gateW_quant", "gateA", "gateB", "gateS", "upW", "upW_quant", "upA", "upB", "upS",
             "downW", "downW_quant", "downA", "downB", "downS", "_forward_function", "_backward_function",
             "inplace", "dropout_p", "gateBias", "upBias", "downBias"]
    if original is None or getattr(original, "_skips_output_in_recompute", False) or not all(
            hasattr(fl, a) for a in ("matmul_lora", "_rms_layernorm", "_may_overwrite_input", "torch_amp_custom_fwd")) \
            or list(inspect.signature(original.forward).parameters) != names:
        return False
    from orchestrator.training.step_graph import Recompute

    unsloth_forward = inspect.unwrap(original.forward)

    class LoRAMLP(original):
        _skips_output_in_recompute = True

        @staticmethod
        @fl.torch_amp_custom_fwd
        def forward(ctx, X, gateW, gateW_quant, gateA, gateB, gateS, upW, upW_quant, upA, upB, upS, downW, downW_quant,
                    downA, downB, downS, _forward_function, _backward_function, inplace=True, dropout_p=None,
                    gateBias=None, upBias=None, downBias=None):
            if not Recompute.active or dropout_p is not None or any(b is not None for b in (gateBias, upBias, downBias)):
                return unsloth_forward(ctx, X, gateW, gateW_quant, gateA, gateB, gateS, upW, upW_quant, upA, upB, upS,
                                       downW, downW_quant, downA, downB, downS, _forward_function,
                                       _backward_function, inplace, dropout_p, gateBias, upBias, downBias)
            e = fl.matmul_lora(X, gateW, gateW_quant, gateA, gateB, gateS)  # as Unsloth's plain path saves them
            g = fl.matmul_lora(X, upW, upW_quant, upA, upB, upS)
            ctx.custom_saved_tensors = (gateW, gateW_quant, gateS, upW, upW_quant, upS, downW, downW_quant, downS,
                                        _backward_function)
            ctx.save_for_backward(gateA, gateB, upA, upB, downA, downB, X, e, g, None, None, None)
            ctx.inplace = inplace and (not fl._rms_layernorm._SAVE_OUTPUT or fl._may_overwrite_input(X))
            ctx.dropout_p = (0.0, 0.0, 0.0)
            ctx.biases = (False, False, False)
            ctx.global_buffer = True
            return torch.empty_like(X)  # the MLP maps the hidden size to itself; never read

    fl.LoRA_MLP = LoRAMLP
    return True


def packed_lengths_without_sync() -> bool:
    """Unsloth copies the host ``packed_seq_lengths`` to the device with a blocking ``.to()`` before masking
    the labels at the packed boundaries: a stream sync per micro-batch (found with
    ``torch.cuda.set_sync_debug_mode``). This stages them through pinned memory and copies them without
    blocking; the values and the masking are Unsloth's own. No-op where Unsloth's helper is not there."""
    try:
        from unsloth.utils import packing
    except ImportError:
        return False
    original = getattr(packing, "_normalize_packed_lengths", None)
    if original is None or getattr(original, "_pinned", False):
        return False

    def normalize(seq_lengths, *, device):
        if isinstance(seq_lengths, torch.Tensor) and seq_lengths.device.type == "cpu" and \
                torch.device(device).type == "cuda":
            seq_lengths = seq_lengths.to(torch.int64).pin_memory().to(device, non_blocking=True)
        return original(seq_lengths, device=device)

    normalize._pinned = True
    packing._normalize_packed_lengths = normalize
    return True


def linear_names(model: torch.nn.Module) -> list[str]:
    """Short names of the decoder's linear layers (``all-linear``, as peft reads it: every linear but the
    output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, mod in model.named_modules():
        if mod is head or name.endswith("lm_head"):
            continue
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def make_backend(name: str) -> Backend:
    return {"hf": Backend, "liger": LigerBackend, "unsloth": UnslothBackend}[name]()
