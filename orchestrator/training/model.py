"""Loading the base model in 4/8/16 bit with bitsandbytes and wrapping it with a peft LoRA adapter."""

from __future__ import annotations

import logging

import torch

from orchestrator.core.config import RunConfig
from orchestrator.core.sources import ModelLoadError, check_model_source

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


def bnb_config(cfg: RunConfig):
    """The BitsAndBytesConfig for a run, or None for 16-bit."""
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    skip = q.skip_modules or None
    if q.bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                  bnb_4bit_use_double_quant=q.double_quant,
                                  bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
                                  bnb_4bit_quant_storage=DTYPES[q.quant_storage], llm_int8_skip_modules=skip)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


def load_base(cfg: RunConfig, device: torch.device, labels: list[str] | None = None, quantize: bool = True):
    """The base model on ``device`` (never device_map="auto": each Ray worker owns one device)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    path = check_model_source(cfg.model.name_or_path)
    qconf = bnb_config(cfg) if quantize else None
    kwargs = dict(quantization_config=qconf, dtype=DTYPES[cfg.quantization.compute_dtype],
                  device_map={"": device}, trust_remote_code=cfg.model.trust_remote_code,
                  revision=cfg.model.revision)
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    try:
        if cfg.model.task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            if not labels:
                raise ModelLoadError("token_classification needs the label list from the data")
            model = AutoModelForTokenClassification.from_pretrained(
                path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={lab: i for i, lab in enumerate(labels)}, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.name_or_path: cannot load {path!r} for {cfg.model.task}: {e}") from e
    model.config.use_cache = False
    return model


def lora_config(cfg: RunConfig):
    from peft import LoraConfig, TaskType

    lc = cfg.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
                      target_modules=lc.target_modules, modules_to_save=lc.modules_to_save or None,
                      task_type=TaskType.CAUSAL_LM if cfg.model.task == "causal_lm" else TaskType.TOKEN_CLS)


def load_for_training(cfg: RunConfig, device: torch.device, labels: list[str] | None = None):
    """Base (quantized per config) + LoRA, ready to train: k-bit preparation, gradient checkpointing,
    and train mode (from_pretrained returns eval mode, where checkpointing silently does nothing)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_base(cfg, device, labels)
    gc = cfg.train.gradient_checkpointing
    if cfg.quantization.bits in (4, 8):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(cfg))
    model.train()
    if keep_4bit_layout_for_training(model) and device.type == "cpu":
        log.info("4-bit base on a CPU with AVX512-BF16: bitsandbytes' packed inference layout stays off while "
                 "training (its kernel has no backward, and ZeRO-3 partitions the weights it would repack)")
    return model


def cpu_4bit_packing() -> bool:
    """Whether bitsandbytes repacks 4-bit weights for this CPU's AVX512-BF16 kernels on inference forwards."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def keep_4bit_layout_for_training(model: torch.nn.Module) -> int:
    """Switch off bitsandbytes' CPU repacking of 4-bit weights in every layer; returns how many layers had it.

    On CPUs with AVX512-BF16, a ``Linear4bit`` in eval mode under ``no_grad`` rewrites its weight into a
    CPU-only [N, K/2] layout and keeps it. In a training run (an eval pass between steps) that is wrong twice:
    the packed kernel has no backward, so every later step silently drops the gradient through the frozen
    base; and under ZeRO-3 the weight it repacks, or later unpacks to save, is a partition, not the matrix.
    Inference-only models (eval, merge, serve) keep the faster packed path.
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def param_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked element count."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def flops_per_token(model, seq_len: int) -> float:
    """Model FLOPs one trained token costs: 4N for a frozen base's matmuls (forward 2N, input gradients 2N; no
    weight gradients but the adapter's, which are small) plus causal attention's 6 x layers x hidden x sequence
    (forward and backward). N counts the matmul weights: every parameter but the input embeddings (the LM head
    counted even when tied to them). Recomputation under gradient checkpointing is not model FLOPs (MFU)."""
    _, total = param_counts(model)
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = total
    if embed is not None:
        n -= embed.weight.numel()
        if getattr(text, "tie_word_embeddings", False) and hasattr(model, "get_output_embeddings") \
                and model.get_output_embeddings() is not None:
            n += embed.weight.numel()
    layers, hidden = getattr(text, "num_hidden_layers", 0), getattr(text, "hidden_size", 0)
    return 4.0 * n + 6.0 * layers * hidden * seq_len
