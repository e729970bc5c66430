"""Any local corpus: a directory of .txt files (one article each) or JSONL records."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from .articles import RawArticle
from .errors import DataError
from .wikitext import TITLE_RE, read_lines


SPLIT_ROLES = {"train": "training text, whose words become the vocabulary", "valid": "validation, tuning",
               "test": "held-out text"}


def text_layout_error(path: Path, split: str) -> DataError:
    """Every folder the text source reads, which of them are missing, and that scoring with a trained
    checkpoint needs only the scored split: said once, not one missing folder per attempt."""
    layout = ", ".join(f"{path / s}/ ({role})" for s, role in SPLIT_ROLES.items())
    missing = [s for s in SPLIT_ROLES if not (path / s).is_dir()]
    flat = sorted(path.glob("*.txt")) if path.is_dir() else []
    found = (f"{path} does not exist" if not path.exists()
             else f"{path} has no {' or '.join(f'{s}/' for s in missing)} folder")
    if flat:
        found += f"; it holds {len(flat)} .txt file(s) directly, outside split folders"
    return DataError(
        f"data.source=text: no {split!r} split: {found}. Expected one folder per split, one article per .txt "
        f"file (subfolders allowed; the file name is the title): {layout}. `dynlm train` needs train/ and "
        f"valid/; scoring with a trained checkpoint needs only the scored split, e.g. the files in "
        f"{path / 'test'}/ and `dynlm evaluate --checkpoint RUN/checkpoints/best.pt --data.source=text "
        f"--data.path={path} --split test`")


def _split_dir(path: str | Path, split: str) -> Path:
    d = Path(path) / split
    if not d.is_dir():
        raise text_layout_error(Path(path), split)
    return d


def text_title(lines: list[str], file: Path) -> str:
    """A WikiText heading (` = Title = `) on the file's first line, else the file name: the title
    labels plots and the heat-map, where a whole first paragraph would not fit."""
    first = next((line.strip() for line in lines if line.strip()), "")
    if TITLE_RE.match(f" {first} "):
        return first.strip("= ").strip()
    return file.stem


def load_text_dir(path: str | Path, split: str) -> list[RawArticle]:
    """`{path}/{split}/**/*.txt`, one article per file; id = path relative to the split dir,
    title = the file name (or the file's WikiText heading). Read directly (not via `datasets`) so
    each article keeps its file name and we get precise UTF-8 errors; equivalent to
    load_dataset("text", sample_by="document")."""
    d = _split_dir(path, split)
    files = sorted(d.rglob("*.txt"))
    if not files:
        raise DataError(f"no .txt files in {d} (one article per .txt file)")
    arts = []
    for f in files:
        lines = read_lines(f)  # raises DataError on empty files / bad UTF-8
        arts.append(RawArticle(f"{split}/{f.relative_to(d).as_posix()}", text_title(lines, f), tuple(lines)))
    return arts


TITLE_CHARS = 60  # a record without a title is labelled by the start of its text


def short_title(text: str) -> str:
    return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1].rstrip() + "…"


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


class Record(BaseModel):
    """One JSONL line: an article. Other fields are ignored."""
    model_config = ConfigDict(extra="ignore")
    text: StrictStr
    title: StrictStr | None = None
    id: StrictStr | StrictInt | None = None


def _record_problem(e: ValidationError) -> str:
    err = e.errors()[0]
    name = ".".join(map(str, err["loc"][:1])) or "record"
    if err["type"] == "missing":
        return f"no {name!r} field (a record is {{\"text\": \"...\", \"title\": ..., \"id\": ...}})"
    wanted = {"text": "a string", "title": "a string or null", "id": "a string, an integer or null"}.get(name, "")
    return f"{name!r} must be {wanted}, got {json.dumps(err.get('input'))}"


def read_records(path: Path) -> list[Record]:
    """The records of a JSONL file (UTF-8, blank lines skipped); a line that is not a valid record is a
    DataError naming the file and the line."""
    records = []
    for n, line in enumerate(read_lines(path), 1):  # read_lines: empty files / bad UTF-8 are errors too
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object such as {{\"text\": \"...\"}}, got "
                            f"{line.strip()[:60]}")
        try:
            records.append(Record.model_validate(data))
        except ValidationError as e:
            raise DataError(f"{path}, line {n}: {_record_problem(e)}") from None
    return records


def load_jsonl(path: str | Path, split: str) -> list[RawArticle]:
    """One article per record: "text" (required), "title" and "id" (optional)."""
    records = [r for f in _jsonl_files(Path(path), split) for r in read_records(f)]
    arts = []
    for i, r in enumerate(records):
        lines = tuple(r.text.split("\n"))
        first = next((line.strip() for line in lines if line.strip()), f"{split} {i}")
        arts.append(RawArticle(f"{split}/{r.id if r.id is not None else f'{i:05d}'}", r.title or short_title(first),
                               lines))
    return arts
