"""What differs between the two tasks, as small named pieces the one training loop calls:
how a batch is collated, how many real tokens it holds, and how validation metrics are computed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from orchestrator.data.pipelines import make_collate
from orchestrator.data.tokenization import IGNORE
from orchestrator.reports.scores import ner_metrics


@dataclass
class EvalAccumulator:
    """Per-rank partial sums of a validation pass; merged across ranks with all_gather_object."""

    loss_sum: float = 0.0
    loss_tokens: int = 0
    true_seqs: list | None = None
    pred_seqs: list | None = None


class Task:
    """Base: loss comes from the model (labels=-100 ignored); subclasses add metrics."""

    name = "task"
    headline = "val_loss"

    def __init__(self, pad_id: int, packed: bool, labels: list[str] | None = None):
        self.pad_id, self.packed, self.labels = pad_id, packed, labels
        self.collate = make_collate(pad_id, packed)

    def forward_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items()
                if k in ("input_ids", "labels", "attention_mask", "position_ids", "packed_seq_lengths")}

    def accumulate(self, acc: EvalAccumulator, batch: dict[str, torch.Tensor], out) -> None:
        n = int((batch["labels"] != IGNORE).sum())
        acc.loss_sum += float(out.loss) * n
        acc.loss_tokens += n

    def finalize(self, parts: list[EvalAccumulator]) -> dict[str, float]:
        loss = sum(p.loss_sum for p in parts) / max(1, sum(p.loss_tokens for p in parts))
        return {"val_loss": loss}


class CausalLMTask(Task):
    name = "causal_lm"
    headline = "val_loss"

    def accumulate(self, acc, batch, out) -> None:
        # Token-weighted loss: recompute from logits so every token counts once, whatever the batch split.
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        acc.loss_sum += float(loss)
        acc.loss_tokens += int((target != IGNORE).sum())

    def finalize(self, parts) -> dict[str, float]:
        loss = sum(p.loss_sum for p in parts) / max(1, sum(p.loss_tokens for p in parts))
        return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class TokenClassificationTask(Task):
    name = "token_classification"
    headline = "entity_f1"

    def accumulate(self, acc, batch, out) -> None:
        super().accumulate(acc, batch, out)
        acc.true_seqs = acc.true_seqs or []
        acc.pred_seqs = acc.pred_seqs or []
        preds = out.logits.argmax(-1).cpu().numpy()
        gold = batch["labels"].cpu().numpy()
        for p_row, g_row in zip(preds, gold, strict=True):
            keep = g_row != IGNORE
            acc.true_seqs.append([self.labels[i] for i in g_row[keep]])
            acc.pred_seqs.append([self.labels[i] for i in p_row[keep]])

    def finalize(self, parts) -> dict[str, float]:
        metrics = super().finalize(parts)
        true = [s for p in parts for s in (p.true_seqs or [])]
        pred = [s for p in parts for s in (p.pred_seqs or [])]
        metrics.update(ner_metrics(true, pred))
        return metrics


def make_task(task: str, pad_id: int, packed: bool, labels: list[str] | None) -> Task:
    if task == "causal_lm":
        return CausalLMTask(pad_id, packed)
    return TokenClassificationTask(pad_id, False, labels)


def count_real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Non-pad tokens in a batch (a tensor on the batch's device: reading it is the caller's one sync):
    attention_mask for padded batches, num_tokens for packed rows."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return batch["num_tokens"].sum()


__all__ = ["Task", "CausalLMTask", "TokenClassificationTask", "EvalAccumulator", "make_task", "count_real_tokens"]
