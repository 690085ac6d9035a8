"""`orchestrator merge CONFIG --adapter DIR`: fold a LoRA adapter into its base and save a standalone model.

Two ways to get the weights the adapter is added to:

* ``16bit`` (default): the original base reloaded in 16-bit (the config's compute dtype), never the 4-bit
  weights. This is the usual QLoRA export; it differs slightly from what was trained, because training
  saw the NF4-rounded base.
* ``dequantized``: the base loaded in 4-bit exactly as in training, then dequantized, so the merged
  weights are dequant(NF4(W)) + BA, the function the adapter was trained against.

Fidelity is measured against the reference the adapter was trained on (adapter applied to the 4-bit base):
per-token KL(reference || merged) averaged over held-out tokens, and top-1 agreement. Both figures land
in the model card (README.md) and ``merge.json`` next to the saved model, which loads with plain
transformers (no peft, no bitsandbytes).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch

from orchestrator.artifacts.adapters import adapter_labels, load_adapter_model, open_adapter, require_adapter
from orchestrator.core.config import RunConfig
from orchestrator.core.io import atomic_dir, atomic_write_text
from orchestrator.core.runtime import quiet
from orchestrator.data.prepare import heldout_rows
from orchestrator.reports.cards import card_text, fidelity_lines, write_card

log = logging.getLogger(__name__)

Method = Literal["16bit", "dequantized"]
METHODS: tuple[Method, ...] = ("16bit", "dequantized")


def merged_model(cfg: RunConfig, adapter: Path, method: Method, device: torch.device):
    """Base (16-bit, or 4-bit dequantized) + adapter, merged and unloaded: a plain transformers model."""
    from peft import PeftModel

    from orchestrator.training.model import load_base

    labels = adapter_labels(adapter)
    if method == "16bit":
        base = load_base(cfg, device, labels, quantize=False)
    else:
        if cfg.quantization.bits == 16:
            raise ValueError("merge --method dequantized needs a quantized base (quantization.bits 4 or 8)")
        base = load_base(cfg, device, labels).dequantize()
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    model.config.use_cache = True  # training turned the KV cache off; inference wants it
    return model.eval()


def heldout_inputs(cfg: RunConfig, tokenizer, rows: list[dict], limit: int) -> list[dict[str, torch.Tensor]]:
    """Model inputs for the fidelity check: formatted QA pairs or NER sentences, one example each."""
    from orchestrator.data.tokenization import format_prompt_answer

    out = []
    for r in rows[:limit]:
        if cfg.model.task == "causal_lm":
            prompt, answer = format_prompt_answer(tokenizer, r["question"], r["answer"], cfg.data.chat_template,
                                                  cfg.data.system_prompt)
            enc = tokenizer(prompt + answer, add_special_tokens=False, truncation=True,
                            max_length=cfg.data.max_seq_length, return_tensors="pt")
        else:
            enc = tokenizer(r["tokens"], is_split_into_words=True, truncation=True,
                            max_length=cfg.data.max_seq_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@torch.no_grad()
def logits_of(model, inputs: list[dict[str, torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
    return [model(**{k: v.to(device) for k, v in x.items()}).logits[0].float().cpu() for x in inputs]


def fidelity(reference: list[torch.Tensor], merged: list[torch.Tensor]) -> dict[str, float]:
    """Mean per-token KL(reference || merged) in nats, its max, and top-1 agreement."""
    kls, agree, n = [], 0, 0
    for r, m in zip(reference, merged, strict=True):
        lp, lq = torch.log_softmax(r, -1), torch.log_softmax(m, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        kls.append(kl)
        agree += int((r.argmax(-1) == m.argmax(-1)).sum())
        n += r.shape[0]
    allkl = torch.cat(kls)
    return {"mean_kl": float(allkl.mean()), "max_kl": float(allkl.max()), "top1_agreement": agree / max(n, 1),
            "tokens": n}


def merge_adapter(cfg: RunConfig, adapter: str | Path, out_dir: str | Path, rows: list[dict],
                  method: Method = "16bit", compare: bool = True, examples: int = 32) -> dict[str, Any]:
    """Merge ``adapter`` by ``method``, save it to ``out_dir`` (atomically) with a model card, and measure
    fidelity on ``rows`` (held-out examples); with ``compare`` the other method's fidelity is measured too."""
    from orchestrator.data.tokenization import load_tokenizer

    adapter, out_dir = require_adapter(adapter), Path(out_dir).resolve()
    if not rows:
        raise ValueError("merge: no held-out examples to measure fidelity on")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(str(adapter))
    inputs = heldout_inputs(cfg, tokenizer, rows, examples)
    ref_model, device = load_adapter_model(cfg, adapter, adapter_labels(adapter))
    reference = logits_of(ref_model, inputs, device)
    del ref_model
    result: dict[str, Any] = {"base": cfg.model.name_or_path, "adapter": str(adapter), "method": method,
                              "task": cfg.model.task, "dtype": cfg.quantization.compute_dtype, "bits": cfg.quantization.bits,
                              "examples": len(inputs), "fidelity": {}}
    for m in ([method] + [x for x in METHODS if x != method and compare]):
        if m == "dequantized" and cfg.quantization.bits == 16:
            continue
        model = merged_model(cfg, adapter, m, device)
        result["fidelity"][m] = fidelity(reference, logits_of(model, inputs, device))
        if m == method:
            with atomic_dir(out_dir) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                result["seconds"] = round(time.perf_counter() - t0, 1)
                (tmp / "merge.json").write_text(json.dumps(result, indent=2))
                (tmp / "README.md").write_text(card_text(cfg, "merged", out_dir.parent, fidelity_lines(result)))
        del model
    # The saved card carries every fidelity measured (the comparison ran after the save).
    atomic_write_text(out_dir / "merge.json", json.dumps(result, indent=2))
    write_card(cfg, "merged", out_dir, fidelity_lines(result))
    from orchestrator.core.tracking import log_to_run

    log_to_run(Path(adapter).parent, {"fidelity": result.get("fidelity", {})}, [out_dir / "merge.json"], job="merge")
    return result


def run_merge(config: str | Path, adapter: str | Path, overrides: list[str] | None = None, out: str | None = None,
              method: Method = "16bit", compare: bool = True, examples: int = 32) -> dict[str, Any]:
    """Entry for `orchestrator merge` and jobs/merge.py. Default output: RUN_DIR/merged."""
    cfg, adapter = open_adapter(config, adapter, overrides)  # the base built or checked before Ray starts
    quiet(adapter.parent / "ray.log")  # the libraries' output to the run's log file (-v: here)
    out_dir = Path(out) if out else Path(adapter).resolve().parent / "merged"
    result = merge_adapter(cfg, adapter, out_dir, heldout_rows(cfg), method, compare, examples)
    for m, f in result["fidelity"].items():
        print(f"{m:>12}: mean KL {f['mean_kl']:.2e}, top-1 agreement {f['top1_agreement']:.4f}")
    print(f"merged model: {out_dir}")
    return result
