"""Where the bench scripts write their results: bench/results/, and $OUT too when a GPU machine's command sets it."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_result(stem: str, tag: str, res: dict) -> None:
    """``res`` as ``{stem}[_{tag}].json`` in bench/results/ and in $OUT (one file where they are the same)."""
    name = f"{stem}{'_' + tag if tag else ''}.json"
    for folder in {ROOT / "bench/results", Path(os.environ.get("OUT", ROOT / "bench/results"))}:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(res, indent=1))
