"""The numbers behind the report: the per-token table of an evaluation and what is computed from it
(improvement by position, trailing means, per-article change)."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.errors import DataError
from ..prequential import perplexity
from ..textio import open_csv

class ReportError(DataError):
    """An evaluation directory the report cannot be drawn from (a DataError, so the CLI exits 2)."""


@dataclass
class TokenTable:
    """tokens.parquet in memory; articles are contiguous runs in reading order."""
    article_ids: list[str]
    titles: list[str]
    starts: np.ndarray  # (A + 1,) token offsets of each article's first token, then N
    position: np.ndarray  # (N,)
    text: list[str]  # (N,) token text (or '#id' when the file has no text column)
    nll: dict[str, np.ndarray]  # mode -> (N,) NLL in nats, static first
    tokenizer_kind: str = "word"
    eos_text: str = "<eos>"

    @property
    def modes(self) -> list[str]:
        """The modes compared against static."""
        return [m for m in self.nll if m != "static"]

    @property
    def n_articles(self) -> int:
        return len(self.article_ids)

    def article_index(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_articles), np.diff(self.starts))

    def improvement(self, mode: str) -> np.ndarray:
        return self.nll["static"] - self.nll[mode]


@dataclass
class Report:
    eval_dir: Path
    modes: list[str]  # non-static modes compared against static
    files: dict[str, Path] = field(default_factory=dict)  # improvement, stream, histogram, heatmap, curve
    curve: dict | None = None  # improvement_by_position(); None when there is nothing to compare
    per_article: tuple[list[str], list[list]] = ((), [])  # columns, rows (per_article.csv)
    message: str = ""


# --- loading -------------------------------------------------------------------------------------

def load_tokens(eval_dir: Path) -> TokenTable:
    path = Path(eval_dir) / "tokens.parquet"
    if not path.is_file():
        raise ReportError(f"{path} not found: `dynlm report --eval DIR` needs the directory written by "
                          f"`dynlm evaluate --out DIR`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ReportError(f"{path}: not a readable parquet file ({e})") from None
    cols = table.column_names
    missing = [c for c in ("article_id", "position", "nll_static") if c not in cols]
    if missing:
        raise ReportError(f"{path}: missing column(s) {missing}; improvements are measured against "
                          f"nll_static (found {cols})")
    if table.num_rows == 0:
        raise ReportError(f"{path}: no tokens")
    ids = np.asarray(table.column("article_id").to_pylist(), dtype=object)
    position = table.column("position").to_numpy().astype(np.int64)
    # a new article starts where the id changes or the position does not grow (evaluate writes
    # each article's tokens contiguously, in reading order)
    new = np.ones(len(ids), dtype=bool)
    new[1:] = (ids[1:] != ids[:-1]) | (position[1:] <= position[:-1])
    starts = np.append(np.flatnonzero(new), len(ids))
    if "text" in cols:
        text = table.column("text").to_pylist()
    elif "token" in cols:
        text = [f"#{t}" for t in table.column("token").to_pylist()]
    else:
        text = ["?"] * len(ids)
    nll = {"static": table.column("nll_static").to_numpy().astype(np.float64)}
    nll.update({c[4:]: table.column(c).to_numpy().astype(np.float64)
                for c in cols if c.startswith("nll_") and c != "nll_static"})
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    article_ids = [str(ids[s]) for s in starts[:-1]]
    titles = _titles(Path(eval_dir) / "per_article.csv")
    return TokenTable(article_ids, [titles.get(a, a) for a in article_ids], starts, position, text, nll,
                      meta.get("dynlm.tokenizer", "word"), meta.get("dynlm.eos_text", "<eos>"))


def _titles(per_article_csv: Path) -> dict[str, str]:
    if not per_article_csv.is_file():
        return {}
    with open_csv(per_article_csv) as f:
        return {r["article_id"]: r.get("title") or r["article_id"] for r in csv.DictReader(f)}


def _number(s: str):
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def per_article_results(eval_dir: Path, t: TokenTable) -> tuple[list[str], list[list]]:
    """per_article.csv as typed rows (for the wandb table); computed from the tokens if it is absent."""
    path = Path(eval_dir) / "per_article.csv"
    if path.is_file():
        with open_csv(path) as f:
            reader = csv.reader(f)
            columns = next(reader, [])
            text_cols = {i for i, c in enumerate(columns) if c in ("mode", "article_id", "title")}
            # one type per column (wandb tables insist), so ids like '12' stay strings
            return columns, [[v if i in text_cols else _number(v) for i, v in enumerate(row)] for row in reader]
    columns = ["mode", "article_id", "title", "n_tokens", "nll_sum", "ppl"]
    n = np.diff(t.starts)
    rows = []
    for mode, nll in t.nll.items():
        sums = np.add.reduceat(nll, t.starts[:-1])
        rows += [[mode, a, title, int(k), float(s), perplexity(float(s), int(k))]
                 for a, title, k, s in zip(t.article_ids, t.titles, n, sums)]
    return columns, rows


# --- numbers -------------------------------------------------------------------------------------

def improvement_by_position(t: TokenTable, bin_width: int) -> dict:
    """Mean improvement (static NLL - mode NLL) over all tokens whose position in their article falls
    in [k * bin_width, (k + 1) * bin_width), per mode; with the tokens and articles behind each bin."""
    bins = t.position // bin_width
    n_tokens = np.bincount(bins)
    keep = n_tokens > 0  # positions can skip bins only in hand-made files
    article_bins = np.unique(np.stack([t.article_index(), bins]), axis=1)[1]
    n_articles = np.bincount(article_bins, minlength=len(n_tokens))
    curve = {"bin_start": (np.flatnonzero(keep) * bin_width).tolist(), "bin_width": bin_width,
             "n_tokens": n_tokens[keep].tolist(), "n_articles": n_articles[keep].tolist(), "improvement": {}}
    for mode in t.modes:
        sums = np.bincount(bins, weights=t.improvement(mode), minlength=len(n_tokens))
        curve["improvement"][mode] = (sums[keep] / n_tokens[keep]).tolist()
    return curve


def trailing_mean(x: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values up to and including each token, never crossing an article
    start, so the jump at a boundary stays visible."""
    out = np.empty(len(x), dtype=np.float64)
    for s, e in zip(starts[:-1], starts[1:]):
        c = np.concatenate([[0.0], np.cumsum(x[s:e])])
        i = np.arange(e - s)
        lo = np.maximum(0, i - window + 1)
        out[s:e] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def per_article_rel_change(t: TokenTable, mode: str) -> np.ndarray:
    """ppl_mode / ppl_static - 1 per article."""
    n = np.diff(t.starts)
    diff = np.add.reduceat(t.nll[mode] - t.nll["static"], t.starts[:-1])
    with np.errstate(over="ignore"):  # a diverged mode: inf, an off-scale article in the histogram
        return np.exp(diff / n) - 1


def write_curve_csv(curve: dict, path: Path) -> None:
    modes = list(curve["improvement"])
    with open_csv(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["bin_start", "bin_end", "n_tokens", "n_articles", *modes])
        for k, start in enumerate(curve["bin_start"]):
            w.writerow([start, start + curve["bin_width"], curve["n_tokens"][k], curve["n_articles"][k],
                        *(curve["improvement"][m][k] for m in modes)])
