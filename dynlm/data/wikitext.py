"""WikiText files -> articles, with the strict title rule: a line ` = Title = ` (one `=` each side) starts an article."""
from __future__ import annotations

import codecs
import re
import warnings
from pathlib import Path

from .articles import RawArticle
from .errors import DataError

TITLE_RE = re.compile(r"^ = [^=].* = $")
BLANK = " "


def is_title(lines, i: int) -> bool:
    """The regex alone over-counts (glossary rows, formulas): require ' ' on both sides."""
    return (
        bool(TITLE_RE.match(lines[i]))
        and 0 < i < len(lines) - 1
        and lines[i - 1] == BLANK
        and lines[i + 1] == BLANK
    )


def title_text(line: str) -> str:
    return line.strip()[2:-2].strip()


def split_wikitext_articles(lines, split: str) -> list[RawArticle]:
    """Every line lands in exactly one article; blank lines before the first title join it."""
    lines = list(lines)
    starts = [i for i in range(len(lines)) if is_title(lines, i)]
    chunks: list[tuple[str, list[str]]] = []
    if not starts:
        if lines:
            warnings.warn(f"{split}: no article title found; using the whole text as one article")
            chunks.append((split, lines))
    else:
        pre = lines[: starts[0]]
        if any(line.strip() for line in pre):
            warnings.warn(f"{split}: {len(pre)} lines before the first title become their own article")
            chunks.append((split, pre))
            pre = []
        bounds = starts[1:] + [len(lines)]
        for k, (s, e) in enumerate(zip(starts, bounds)):
            chunk = (pre if k == 0 else []) + lines[s:e]
            chunks.append((title_text(lines[s]), chunk))
    return [RawArticle(f"{split}/{i:05d}", t, tuple(c)) for i, (t, c) in enumerate(chunks)]


def read_lines(path: Path) -> list[str]:
    """Strict UTF-8 read, whatever the locale; a byte-order mark at the start is dropped (it is not text).
    The error names the file and the byte offset."""
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    if not data[bom:].strip():
        raise DataError(f"{path} is empty")
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte offset {bom + e.start}") from None
    lines = text.split("\n")
    if lines[-1] == "":  # trailing newline, not an extra line
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def wikitext_files(path: str | Path, split: str) -> list[Path]:
    return [Path(path) / f"wiki.{split}.tokens", Path(path) / f"{split}.txt"]


def read_wikitext_dir(path: str | Path, split: str) -> list[RawArticle]:
    candidates = wikitext_files(path, split)
    for f in candidates:
        if f.is_file():
            return split_wikitext_articles(read_lines(f), split)
    raise DataError(
        f"no {split!r} split in WikiText directory {Path(path)}: looked for "
        + " and ".join(c.name for c in candidates)
    )
