"""Any local corpus: a directory of .txt files (one article each) or JSONL records."""
from __future__ import annotations

from pathlib import Path

from .articles import RawArticle
from .errors import DataError
from .wikitext import read_lines


def _split_dir(path: str | Path, split: str) -> Path:
    d = Path(path) / split
    if not d.is_dir():
        raise DataError(f"no {split!r} split under {Path(path)}: expected a subdirectory {d}")
    return d


def load_text_dir(path: str | Path, split: str) -> list[RawArticle]:
    """`{path}/{split}/**/*.txt`, one article per file; id = path relative to the split dir.
    Read directly (not via `datasets`) so each article keeps its file name and we get
    precise UTF-8 errors; equivalent to load_dataset("text", sample_by="document")."""
    d = _split_dir(path, split)
    files = sorted(d.rglob("*.txt"))
    if not files:
        raise DataError(f"no .txt files in {d}")
    arts = []
    for f in files:
        lines = read_lines(f)  # raises DataError on empty files / bad UTF-8
        first = next((line.strip() for line in lines if line.strip()), "")
        title = first.strip("= ").strip() or f.stem
        arts.append(RawArticle(f"{split}/{f.relative_to(d).as_posix()}", title, tuple(lines)))
    return arts


def _jsonl_files(path: Path, split: str) -> list[Path]:
    if path.is_file():  # a file stands for its split; other splits are its siblings
        path = path if path.stem == split else path.parent / f"{split}.jsonl"
        if path.is_file():
            return [path]
    elif (path / f"{split}.jsonl").is_file():
        return [path / f"{split}.jsonl"]
    elif (path / split).is_dir():
        files = sorted((path / split).glob("*.jsonl"))
        if files:
            return files
    raise DataError(f"no {split!r} split for JSONL corpus {path}: looked for {split}.jsonl or {split}/*.jsonl")


def load_jsonl(path: str | Path, split: str) -> list[RawArticle]:
    """One article per record: "text" (required), "title" and "id" (optional)."""
    import datasets

    files = _jsonl_files(Path(path), split)
    for f in files:
        read_lines(f)  # clear errors for empty files / bad UTF-8 before pyarrow sees them
    try:
        ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    except Exception as e:
        raise DataError(f"could not read JSONL {', '.join(map(str, files))}: {e}") from e
    if "text" not in ds.column_names:
        raise DataError(f"JSONL records in {files[0]} need a 'text' field (found {ds.column_names})")
    cols = {c: ds[c] if c in ds.column_names else [None] * len(ds) for c in ("text", "title", "id")}
    arts = []
    for i, (text, title, rid) in enumerate(zip(cols["text"], cols["title"], cols["id"])):
        lines = tuple((text or "").split("\n"))
        first = next((line.strip() for line in lines if line.strip()), f"{split} {i}")
        arts.append(RawArticle(f"{split}/{rid if rid is not None else f'{i:05d}'}",
                               str(title) if title else first, lines))
    return arts
