"""Atomic file and directory writes: outputs are complete or absent, never half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling file name for a writer that opens files itself; on success it replaces ``path``
    in one rename, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sniff(path: Path) -> str:
    """What a file starts as: "pdf", "gzip" or "" (anything else)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    return "pdf" if head.startswith(b"%PDF") else "gzip" if head.startswith(b"\x1f\x8b") else ""


MAX_LINE_BYTES = 16 * 2**20  # one record (a QA pair, a CoNLL token line, a JSON document) per line


def text_lines(path: str | Path, max_line: int | None = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, gzip-compressed when its name ends in .gz. A file that is not
    such text ends in one ValueError naming the file, the line and what the file looks like."""
    import gzip

    path = Path(path)
    if _sniff(path) == "pdf":
        raise ValueError(f"{path}: a PDF, not a text file (data.format pdf reads PDFs)")
    lineno, raw = 0, b""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            while raw := f.readline(max_line + 1 if max_line else -1):  # bounded: no line read whole past the cap
                lineno += 1
                if max_line and len(raw) > max_line:
                    raise ValueError(f"{path}:{lineno}: a line longer than {MAX_LINE_BYTES // 2**20} MiB "
                                     "(one record per line expected)")
                yield lineno, raw.decode("utf-8")  # decoded line by line, so the error names the line
    except UnicodeDecodeError:
        hint = "it is gzip-compressed: name it *.gz" if _sniff(path) == "gzip" else "binary data?"
        raise ValueError(f"{path}:{lineno}: not UTF-8 text ({hint})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e})") from None


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (gzip-aware), with the same one-line errors as :func:`text_lines`."""
    return "".join(line for _, line in text_lines(path, max_line=None))  # a JSON document may be one line
