"""Tables for the console (aligned text) and for Markdown reports."""

from __future__ import annotations

from typing import Any


def cell(v: Any) -> str:
    """A value as a table cell: floats to 4 significant digits, None as a dash."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def text_table(rows: list[list[str]], rule: bool = False) -> str:
    """Rows (the first is the header) as aligned columns; ``rule``: dashes under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    out = [line(rows[0])] + ([line(["-" * w for w in widths])] if rule else []) + [line(r) for r in rows[1:]]
    return "\n".join(out)


def markdown_table(rows: list[list[str]]) -> str:
    """Rows (the first is the header) as a Markdown table."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows[1:]])
