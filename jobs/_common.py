"""Shared argument handling for the `ray job submit` entry points."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse(description: str, extra=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    if extra:
        extra(ap)
    return ap.parse_args()


def run(fn) -> None:
    """Run a job body; exit non-zero with a one-line message on a known failure."""
    from orchestrator.config import ConfigError
    from orchestrator.model import ModelLoadError
    from orchestrator.runtime import setup_logging

    setup_logging()
    try:
        fn()
    except (ConfigError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
