"""Legal documents: PDF page text, page-furniture cleaning, and segmentation into Parts and Articles.

These are pure functions over strings; :mod:`orchestrator.data.pipelines` runs them inside Ray Data
(pages are extracted in parallel, then each document's pages are segmented in order).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pypdf import PdfReader

_PAGE_NUMBER = re.compile(r"^\s*(?:-\s*)?\d{1,4}(?:\s*-)?\s*$")
_PART = re.compile(r"^\s*Part\s*-?\s*(\d{1,2})\s*$", re.IGNORECASE)
_ARTICLE = re.compile(r"^\s*(\d{1,3})\s*\.\s+(\S.*)$")
_SCHEDULE = re.compile(r"^\s*Schedule\s*-?\s*\d+\s*$", re.IGNORECASE)
_CLAUSE = re.compile(r"(?:(?<=^)|(?<=\s)|(?<=:))\((\d{1,2})\)\s+")
_SUBCLAUSE = re.compile(r"(?:(?<=^)|(?<=\s)|(?<=:))\(([a-z]|[ivx]{1,4})\)\s+")
_MAX_TITLE_LINES = 3


@dataclass
class Clause:
    number: str
    text: str
    subclauses: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Article:
    number: int
    title: str
    text: str
    part_number: int | None
    part_title: str | None
    page: int
    clauses: list[Clause] = field(default_factory=list)

    def to_row(self) -> dict:
        row = asdict(self)
        row["clauses"] = [asdict(c) for c in self.clauses]
        return row


def open_pdf(path: str | Path) -> PdfReader:
    """A PdfReader, or a one-line ValueError naming the file: empty, encrypted, or not a readable PDF."""
    from pypdf.errors import PdfReadError, PdfStreamError

    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"{p}: an empty file, not a PDF")
    try:
        reader = PdfReader(str(p))
        if reader.is_encrypted:
            raise ValueError(f"{p}: an encrypted PDF; decrypt it first (e.g. qpdf --decrypt IN OUT)")
        len(reader.pages)  # the page tree is where a truncated or corrupt file fails
    except (PdfReadError, PdfStreamError, OSError) as e:
        raise ValueError(f"{p}: not a readable PDF ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return reader


def pdf_page_count(path: str | Path) -> int:
    return len(open_pdf(path).pages)


def extract_pages(path: str | Path, pages: list[int]) -> list[str]:
    """Extract the text of the given 0-based pages of one PDF."""
    reader = open_pdf(path)
    return [reader.pages[i].extract_text() or "" for i in pages]


def clean_page(text: str) -> list[str]:
    """Drop page furniture (page-number lines, blank lines) and normalise whitespace."""
    lines = []
    for raw in text.replace("\u00a0", " ").splitlines():
        line = re.sub(r"\s+", " ", raw).strip()
        if not line or _PAGE_NUMBER.match(line):
            continue
        lines.append(line)
    return lines


def _split_title(lines: list[str], start: int, first: str) -> tuple[str, str, int] | None:
    """Join up to a few lines until the title's closing colon. Returns (title, rest, next_index)."""
    buf = first
    i = start
    for _ in range(_MAX_TITLE_LINES):
        if ":" in buf:
            title, rest = buf.split(":", 1)
            title = title.strip().rstrip(".")
            if title and len(title) <= 200 and not re.search(r"\(\d+\)", title):
                return title, rest.strip(), i
            return None
        if i >= len(lines) or _ARTICLE.match(lines[i]) or _PART.match(lines[i]):
            return None
        buf = f"{buf} {lines[i]}"
        i += 1
    return None


def split_clauses(body: str) -> list[Clause]:
    """Split an article body into numbered clauses ``(1)``, ``(2)`` ... and sub-clauses ``(a)``, ``(b)``."""
    marks = [m for m in _CLAUSE.finditer(body)]
    # Keep only a strictly increasing run 1, 2, 3... so cross-references like "clause (3)" are ignored.
    kept, expect = [], 1
    for m in marks:
        if int(m.group(1)) == expect and (m.start() == 0 or body[m.start() - 1] in " :\n"):
            prev = body[: m.start()].rstrip()
            if m.start() == 0 or expect == 1 or prev.endswith((".", ":", ";", ",", "-")) or prev.endswith("and"):
                kept.append(m)
                expect += 1
    clauses = []
    for j, m in enumerate(kept):
        end = kept[j + 1].start() if j + 1 < len(kept) else len(body)
        text = body[m.end() : end].strip()
        clauses.append(Clause(number=m.group(1), text=text, subclauses=_split_subclauses(text)))
    return clauses


def _split_subclauses(text: str) -> list[tuple[str, str]]:
    marks = list(_SUBCLAUSE.finditer(text))
    letters = [m for m in marks if len(m.group(1)) == 1]
    kept, expect = [], "a"
    for m in letters:
        if m.group(1) == expect:
            kept.append(m)
            expect = chr(ord(expect) + 1)
    out = []
    for j, m in enumerate(kept):
        end = kept[j + 1].start() if j + 1 < len(kept) else len(text)
        out.append((m.group(1), text[m.end() : end].strip().rstrip(",;").strip()))
    return out


def segment(pages: list[tuple[int, list[str]]]) -> list[Article]:
    """Segment cleaned pages (page index, lines), in order, into Articles grouped by Part.

    Article headings are lines ``N. Title: text`` whose number continues the sequence (N = last + 1,
    allowing a gap of up to two missing articles), so numbered list items inside an article are not
    mistaken for headings. Text before the first Part heading (cover, contents, preamble) and after the
    first Schedule heading that follows the articles is ignored.
    """
    flat: list[tuple[int, str]] = [(p, line) for p, lines in pages for line in lines]
    lines = [line for _, line in flat]
    articles: list[Article] = []
    part_no: int | None = None
    part_title: str | None = None
    started = False
    body: list[str] | None = None
    i = 0

    def close() -> None:
        # Finish the open article (if any) with the body lines gathered since its heading.
        if articles and body is not None:
            text = re.sub(r"\s+", " ", " ".join(body)).strip()
            articles[-1].text = text
            articles[-1].clauses = split_clauses(text)

    while i < len(lines):
        line = lines[i]
        part = _PART.match(line)
        if part and i + 1 < len(lines) and not _ARTICLE.match(lines[i + 1]):
            # A Part heading is the number line followed by its title line. The contents pages list
            # them too, but without articles after them; the last Part heading before an article wins.
            close()
            body = None
            part_no, part_title = int(part.group(1)), lines[i + 1].strip()
            started = True
            i += 2
            continue
        if started and articles and _SCHEDULE.match(line) and articles[-1].number >= 2:
            close()
            body = None
            started = False  # appendices: no more articles
            break
        art = _ARTICLE.match(line) if started else None
        if art:
            n = int(art.group(1))
            last = articles[-1].number if articles else 0
            if last < n <= last + 3:
                split = _split_title(lines, i + 1, art.group(2))
                if split:
                    title, rest, nxt = split
                    close()
                    articles.append(Article(n, title, "", part_no, part_title, flat[i][0]))
                    body = [rest] if rest else []
                    i = nxt
                    continue
        if started and body is not None:
            body.append(line)
        i += 1
    close()
    return articles
