"""Train / validation / test splits of rows (QA pairs or NER sentences) for sources that come as one set."""

from __future__ import annotations

import random

from orchestrator.core.config import RunConfig

SPLITS = ("train", "validation", "test")


def split_rows(rows: list, seed: int, fractions=(0.8, 0.1, 0.1)) -> tuple[list, list, list]:
    """Seeded shuffle, then cut by ``fractions`` (train, validation, test)."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_train = int(round(fractions[0] * len(rows)))
    n_val = int(round(fractions[1] * len(rows)))
    pick = lambda ids: [rows[i] for i in ids]  # noqa: E731
    return pick(idx[:n_train]), pick(idx[n_train:n_train + n_val]), pick(idx[n_train + n_val:])


def split_for(cfg: RunConfig, rows: list[dict]) -> dict[str, list[dict]]:
    """The config's seeded split (``data.split_seed``, ``data.split_fractions``) as a dict of splits."""
    train, val, test = split_rows(rows, cfg.data.split_seed, cfg.data.split_fractions)
    return {"train": train, "validation": val, "test": test}


def cap_splits(cfg: RunConfig, splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each split cut to ``data.max_examples`` (tests, demos)."""
    n = cfg.data.max_examples
    return {k: (v[:n] if n else v) for k, v in splits.items()}
