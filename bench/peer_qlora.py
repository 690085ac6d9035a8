"""The peers' QLoRA training throughput on one GPU, same 7B shape and recipe: hf | liger | unsloth (one per process).

    python bench/peer_qlora.py --variant unsloth --model /tmp/llama7b --shapes 512x4,512x8 --out /tmp/peer.json

The recipe of the peers' own examples: NF4 + double quant, bf16 compute, LoRA r=16 alpha 32 dropout 0 on all 7
linear projections, paged AdamW 32-bit, gradient checkpointing (Unsloth's own offloaded kind for unsloth), random
tokens (all real, no padding), ``model(input_ids, labels)`` then backward and an optimizer step.

- ``hf``: transformers + peft + bitsandbytes, ``prepare_model_for_kbit_training``, SDPA attention.
- ``liger``: the same with Liger Kernel's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy.
- ``unsloth``: ``FastLanguageModel`` (imported before transformers, as Unsloth requires).

Per shape SEQxBATCH: 3 warm-up steps, then ``--steps`` timed steps (one device sync each); median tokens/s,
peak allocated/reserved memory since the shape began. ``bench/train_gpu.py`` runs this beside the project.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(variant: str, path: str):
    import torch

    if variant == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=2048, dtype=torch.bfloat16,
                                                     load_in_4bit=True)
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, bias="none",
                                                target_modules=TARGETS, use_gradient_checkpointing="unsloth")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": 0},
                                                 dtype=torch.bfloat16, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=TARGETS))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True, choices=["hf", "liger", "unsloth"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--shapes", default="512x4,512x8")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile-dir", help="profile steps 6-8 of the first shape (orchestrator/profile.py's summary)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    if args.variant == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers)
    import bitsandbytes as bnb
    import torch

    t0 = time.perf_counter()
    model = load(args.variant, args.model)
    model.train()
    load_s = time.perf_counter() - t0
    opt = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    vocab = model.config.vocab_size
    res = {"variant": args.variant, "device": torch.cuda.get_device_name(), "load_s": round(load_s, 1),
           "versions": {m: getattr(sys.modules[m], "__version__", "?") for m in
                        ("torch", "transformers", "peft", "bitsandbytes", "unsloth", "liger_kernel", "triton")
                        if m in sys.modules}, "runs": {}}
    for shape in args.shapes.split(","):
        seq, bs = map(int, shape.split("x"))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        x = torch.randint(3, min(vocab, 8000), (bs, seq), device="cuda")
        times = []
        profiler = None
        if args.profile_dir and not res["runs"]:
            from orchestrator.training.profile import StepProfiler

            profiler = StepProfiler((6, 8), Path(args.profile_dir), True)
        try:
            for i in range(3 + args.steps):
                torch.cuda.synchronize()
                t = time.perf_counter()
                if profiler:
                    profiler.step_begins(i + 1)
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if profiler:
                    profiler.step_ends(i + 1)
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(time.perf_counter() - t)
            step = statistics.median(times)
            r = {"median_step_s": round(step, 4), "median_tokens_per_s_per_gpu": round(bs * seq / step, 1),
                 "peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20),
                 "peak_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20),
                 "steps_measured": len(times), "loss": round(loss.item(), 4)}
            if profiler and (Path(args.profile_dir) / "summary.json").is_file():
                r["profile"] = json.loads((Path(args.profile_dir) / "summary.json").read_text())
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            r = {"oom": True}
        res["runs"][shape] = r
        print(json.dumps({args.variant: {shape: r}}), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
