"""Shared argument handling for the `ray job submit` entry points."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse(description: str, extra=None, many: bool = False) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("config", nargs="+" if many else None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    if extra:
        extra(ap)
    return ap.parse_args()


def output_dirs(args: argparse.Namespace) -> list[str]:
    """Where the job's configs (run configs or a pipeline file) put their outputs."""
    from orchestrator.core.config import load_config, read_raw
    from orchestrator.pipeline import load_pipeline

    dirs = []
    for path in args.config if isinstance(args.config, list) else [args.config]:
        if "runs" in read_raw(path):  # a pipeline file
            dirs += [c.output_dir for c in load_pipeline(path, args.overrides)[1]]
        else:
            dirs.append(load_config(path, args.overrides).output_dir)
    return dirs


def run(fn, args: argparse.Namespace | None = None) -> None:
    """Run a job body; exit non-zero with a one-line message on a known failure. With ``args``, first say in
    one line when the outputs would land in the job's temporary working directory."""
    from orchestrator.core.config import ConfigError
    from orchestrator.core.runtime import setup_logging, temporary_outputs_note
    from orchestrator.core.sources import ModelLoadError

    setup_logging()
    try:
        if args is not None and (note := temporary_outputs_note(output_dirs(args))):
            print(note, flush=True)
        fn()
    except (ConfigError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
