"""The config reference in the README, generated from the schema (`orchestrator reference --write`)."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from orchestrator.core.config import PipelineConfig, RunConfig
from orchestrator.core.io import atomic_write_text

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _type(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" if not isinstance(a, str) else f"`{a}`" for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(t))
    if origin is typing.Annotated:
        return _type(typing.get_args(t)[0])
    if origin in (list, tuple, dict):
        args = ", ".join(_type(a) for a in typing.get_args(t) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    if t is type(None):
        return "null"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return f"section `{t.__name__}`"
    return getattr(t, "__name__", str(t))


def _default(f: FieldInfo) -> str:
    if f.default_factory is not None:
        v = f.default_factory()
        if isinstance(v, BaseModel):
            return "(section)"
        return f"`{v!r}`" if v not in ([], {}) else f"`{v}`"
    if f.default is PydanticUndefined:
        return "**required**"
    return f"`{f.default!r}`" if f.default is not None else "`null`"


def _constraints(f: FieldInfo) -> str:
    out = []
    for m in f.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "min items"),
                          ("pattern", "matches")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} `{v}`")
    return ", ".join(out)


def _section(model: type[BaseModel], path: str, out: list[str], seen: set[type]) -> None:
    nested = []
    rows = []
    for name, f in model.model_fields.items():
        t = f.annotation
        if isinstance(t, type) and issubclass(t, BaseModel):
            nested.append((name, t))
            continue
        args = typing.get_args(t)
        inner = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if inner is not None and inner not in seen:
            nested.append((name + ("[]" if typing.get_origin(t) is list else ".*"), inner))
        desc = " ".join(x for x in ((f.description or "").replace("|", "\\|"), _constraints(f)) if x)
        rows.append(f"| `{name}` | {_type(t)} | {_default(f)} | {desc} |")
    title = path or model.__name__
    doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    out += [f"#### `{title}`", "", doc, "", "| field | type | default | notes |", "|---|---|---|---|", *rows, ""]
    for name, sub in nested:
        seen.add(sub)
        _section(sub, f"{path}.{name}" if path else name, out, seen)


def config_reference() -> str:
    out = ["### Run config (`RunConfig`)", ""]
    _section(RunConfig, "", out, set())
    out += ["### Pipeline file (`PipelineConfig`: `orchestrator pipeline`, `orchestrator demo`)", ""]
    _section(PipelineConfig, "", out, set())
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme: Path, write: bool) -> bool:
    """Whether the README's reference is current; with ``write``, make it so."""
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme}: no {START} ... {END} block")
    new = pattern.sub(lambda _: f"{START}\n{config_reference()}{END}", text)
    if write and new != text:
        atomic_write_text(readme, new)
    return new == text
