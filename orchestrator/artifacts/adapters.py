"""A trained adapter as the later stages open it: checked (``adapter_config.json``), its base found (the one it
records, else the config's; said in one line), the base made ready, and the model loaded with it applied."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.core.config import ConfigError, RunConfig, load_config, set_fields
from orchestrator.core.sources import ModelLoadError, check_model_source
from orchestrator.data.base import ensure_model


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it has ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def require_adapter(adapter: str | Path) -> Path:
    """``adapter`` resolved, or a one-line error when it is not a PEFT adapter directory or its weights file is
    damaged (cut short, say)."""
    path = Path(adapter).resolve()
    if not is_adapter(path):
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json (expected a PEFT adapter directory)")
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights)
    return path


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header reads and whose tensors all lie inside the file (a copy cut short, or not a
    safetensors file at all, is one line naming it)."""
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("its header runs past the end")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
    if 8 + n + end > size:
        raise ConfigError(f"{path}: cut short ({size:,} bytes; its tensors need {8 + n + end:,})")


def open_adapter(config: str | Path, adapter: str | Path, overrides: list[str] | None = None
                 ) -> tuple[RunConfig, Path]:
    """The run config to load ``adapter`` with (its recorded base followed) and the adapter's path, the base
    built or checked before any Ray work: the first step of eval, merge and export."""
    path = require_adapter(adapter)
    cfg = follow_adapter_base(load_config(config, overrides), path)
    ensure_model(cfg)
    return cfg, path


def adapter_labels(adapter: Path) -> list[str] | None:
    """The label list a token-classification adapter was trained with (``labels.json``), or None."""
    f = Path(adapter) / "labels.json"
    return json.loads(f.read_text()) if f.exists() else None


def follow_adapter_base(cfg: RunConfig, adapter: str | Path) -> RunConfig:
    """The config to load ``adapter`` with: its base is the one the adapter records (``adapter_config.json``
    base_model_name_or_path) when that differs from the config's and can be found; said in one line.
    A base found in neither place is a one-line error naming both."""
    f = Path(adapter) / "adapter_config.json"
    recorded = json.loads(f.read_text()).get("base_model_name_or_path") if f.is_file() else None
    named = cfg.model.name_or_path
    if not recorded or recorded == named:
        return cfg

    def found(name: str) -> bool:
        try:
            path = check_model_source(name)
        except ModelLoadError:
            return False
        return Path(path).exists() or not Path(name).is_absolute()  # a hub id cannot be checked offline

    if found(recorded):
        print(f"{adapter}: trained on {recorded}; using that base (the config names {named})")
        return set_fields(cfg, {"model.name_or_path": recorded, "model.build_tiny": False})
    if found(named) or cfg.model.build_tiny:
        print(f"{adapter}: trained on {recorded}, which is not here; using the config's base {named}")
        return cfg
    raise ModelLoadError(f"no base model for {adapter}: not at {recorded} (adapter_config.json "
                         f"base_model_name_or_path) nor at {named} (model.name_or_path)")


def load_adapter_model(cfg: RunConfig, adapter: Path, labels: list[str] | None = None):
    """The configured (quantized) base with the trained adapter applied, in eval mode."""
    import torch
    from peft import PeftModel

    from orchestrator.training.model import load_base

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base(cfg, device, labels)
    return PeftModel.from_pretrained(base, str(adapter)).eval(), device
