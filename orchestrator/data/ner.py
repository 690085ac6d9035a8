"""NER corpora: CoNLL/BIO (token<TAB>tag) and JSON ({"text", "labels": [{"word", "entity"}]}) readers.

Every problem is either an error naming the file and line, or, with ``repair=True``, a counted and
logged fix (I- without B- becomes B-, empty sentences are dropped). Tag shapes and column counts are
always errors: they cannot be guessed.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.core.io import read_text, text_lines

log = logging.getLogger(__name__)

_TAG = re.compile(r"^(O|[BI]-[A-Za-z][A-Za-z0-9_.-]*)$")


class NERFormatError(ValueError):
    """A NER file is malformed; the message names the file and line."""


@dataclass
class Repairs:
    i_without_b: int = 0
    empty_sentences: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {kind.replace('_', ' ')}")

    @property
    def total(self) -> int:
        return self.i_without_b + self.empty_sentences


def _check_bio(tags: list[str], lines: list[int], path: Path, repair: bool, repairs: Repairs) -> list[str]:
    out = list(tags)
    prev = "O"
    for k, tag in enumerate(out):
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            where = f"{path}:{lines[k]}"
            if not repair:
                raise NERFormatError(f"{where}: tag {tag} follows {prev} (I- without B-); "
                                     "fix the file or set data.repair=true")
            out[k] = "B-" + tag[2:]
            repairs.add("i_without_b", where)
        prev = out[k]
    return out


def read_conll(path: str | Path, repair: bool = False, repairs: Repairs | None = None) -> list[dict]:
    """Read token<TAB>tag lines; blank lines separate sentences; ``-DOCSTART-`` lines are skipped."""
    path = Path(path)
    repairs = repairs if repairs is not None else Repairs()
    sentences: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []
    start = 1
    blank_run = 0

    def flush(lineno: int) -> None:
        nonlocal tokens, tags, lines
        if tokens:
            sentences.append({"tokens": tokens, "tags": _check_bio(tags, lines, path, repair, repairs)})
        tokens, tags, lines = [], [], []

    for lineno, raw in text_lines(path):
        line = raw.rstrip("\n").rstrip("\r")
        if not line.strip():
            blank_run += 1
            if blank_run == 2 and not tokens:
                # Two separators in a row: an empty sentence.
                if not repair:
                    raise NERFormatError(f"{path}:{lineno}: empty sentence (consecutive blank lines); "
                                         "fix the file or set data.repair=true")
                repairs.add("empty_sentences", f"{path}:{lineno}")
                blank_run = 1
            flush(lineno)
            continue
        blank_run = 0
        if line.startswith("-DOCSTART-"):
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise NERFormatError(f"{path}:{lineno}: expected 2 tab-separated columns (token, tag), "
                                 f"found {len(cols)}: {line[:60]!r}")
        token, tag = cols[0], cols[1].strip()
        if not token.strip():
            raise NERFormatError(f"{path}:{lineno}: empty token")
        if not _TAG.match(tag):
            raise NERFormatError(f"{path}:{lineno}: unknown tag shape {tag!r} (expected O, B-TYPE or I-TYPE)")
        if not tokens:
            start = lineno
        tokens.append(token)
        tags.append(tag)
        lines.append(lineno)
    del start
    flush(0)
    if not sentences:
        raise NERFormatError(f"{path}: no sentences found")
    return sentences


def read_ner_json(path: str | Path, repair: bool = False, repairs: Repairs | None = None) -> list[dict]:
    """Read the JSON form: a list (or JSON lines) of {"text": str, "labels": [{"word", "entity"}]}.

    ``labels`` gives one entry per whitespace token of ``text`` in order; ``entity`` is a BIO tag.
    """
    path = Path(path)
    repairs = repairs if repairs is not None else Repairs()
    raw = read_text(path)
    try:
        data = json.loads(raw)
        items = [(i + 1, obj) for i, obj in enumerate(data)] if isinstance(data, list) else [(1, data)]
        unit = "item"
    except json.JSONDecodeError:
        items, unit = [], "line"
        for lineno, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    items.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise NERFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    sentences = []
    for idx, obj in items:
        where = f"{path}:{unit} {idx}"
        if not isinstance(obj, dict) or not isinstance(obj.get("labels"), list):
            raise NERFormatError(f"{where}: expected an object with a 'labels' list")
        labels = obj["labels"]
        if not labels:
            if not repair:
                raise NERFormatError(f"{where}: empty sentence; fix the file or set data.repair=true")
            repairs.add("empty_sentences", where)
            continue
        tokens, tags = [], []
        for j, lab in enumerate(labels):
            if not isinstance(lab, dict) or not isinstance(lab.get("word"), str) or not isinstance(lab.get("entity"), str):
                raise NERFormatError(f"{where}: labels[{j}] needs string fields 'word' and 'entity'")
            if not _TAG.match(lab["entity"]):
                raise NERFormatError(f"{where}: labels[{j}]: unknown tag shape {lab['entity']!r}")
            tokens.append(lab["word"])
            tags.append(lab["entity"])
        text = obj.get("text")
        if isinstance(text, str) and text.split() != tokens:
            raise NERFormatError(f"{where}: 'labels' words do not match the whitespace tokens of 'text'")
        tags = _check_bio(tags, [idx] * len(tags), Path(f"{path}:{unit}"), repair, repairs)
        sentences.append({"tokens": tokens, "tags": tags})
    if not sentences:
        raise NERFormatError(f"{path}: no sentences found")
    return sentences


def read_ner(paths: list[str | Path], fmt: str, repair: bool = False) -> tuple[list[dict], Repairs]:
    repairs = Repairs()
    reader = read_conll if fmt == "conll" else read_ner_json
    rows: list[dict] = []
    for p in paths:
        rows.extend(reader(p, repair=repair, repairs=repairs))
    if repairs.total:
        log.warning("NER repairs: %d I- without B-, %d empty sentences (e.g. %s)",
                    repairs.i_without_b, repairs.empty_sentences, "; ".join(repairs.examples[:3]))
    return rows, repairs


def label_list(sentences: list[dict]) -> list[str]:
    """Labels from the data: O first, then B-/I- pairs for every entity type, sorted."""
    types = sorted({t[2:] for s in sentences for t in s["tags"] if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]
