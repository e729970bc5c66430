"""`dynlm report --eval DIR`: where people look at per-token loss improvements.

Renders from DIR/tokens.parquet (and per_article.csv for titles) written by `dynlm evaluate`:

- improvement.png      loss improvement (static NLL - mode NLL, nats/token) against position in the
                       article, averaged over all tokens in position bins; one line per mode
- improvement_by_position.csv   the numbers behind improvement.png
- stream.png           the paper's figure: per-token improvement (static NLL - mode NLL, nats, trailing
                       mean within each article) along consecutive articles A, B, C, ... with boundaries
- histogram.png        per-article relative perplexity change vs static, per mode
- drift.png            relative weight drift ||theta - theta0|| / ||theta0|| of each adaptive mode
                       against tokens read (from drift.csv): does online adaptation stay bounded?
- heatmap.html         selected articles, every token coloured by its improvement (blue: mode better,
                       red: worse, white: equal; tooltip with both NLLs); self-contained, no JS

Every y-range (x-range for the histogram) is set by the bulk of the data, not by its outliers
(`robust_limits`): a spike at an article start is marked with a triangle on the axis edge and its
peak named in the legend instead of flattening every curve.

Improvement is always measured against the `static` column, so a file without a non-static mode
has nothing to compare: no plots are drawn and heatmap.html only shows the static NLLs.
"""
from __future__ import annotations

import csv
import html
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend, Agg canvas
from matplotlib.ticker import MaxNLocator

from .config import ReportConfig
from .data.errors import DataError
from .prequential import perplexity
from .textio import open_csv

# One colour per adapting rule and the weights it rewrites, kept by name in every plot of every report
# (matplotlib's colour cycle would give a mode the colour of its place in the list instead); `+cache`
# keeps its mode's colour, dashed. Modes not named here get a colour of FALLBACK chosen by their name.
MODE_COLORS = {
    "learned": "#1f77b4", "learned@all": "#17becf",  # blues
    "dyneval": "#d62728", "dyneval@all": "#d62728", "dyneval@lstm": "#ff7f0e",  # red (all weights), orange
    "adam": "#9467bd", "adam@all": "#e377c2",  # purple, pink
    "sgd": "#2ca02c", "sgd@all": "#bcbd22",  # greens
    "cache": "#8c564b",  # brown: the cache on the static model
}
FALLBACK = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354")
COUNTS_COLOR = "0.55"  # the grey of "articles in bin"


@dataclass(frozen=True)
class ModeStyle:
    color: str
    linestyle: str  # "-", or "--" for MODE+cache


def mode_style(mode: str) -> ModeStyle:
    """How `mode` is drawn in every figure: its rule's colour (MODE_COLORS), dashed when it adds the cache."""
    base = mode.removesuffix("+cache")
    color = MODE_COLORS.get(base) or FALLBACK[zlib.crc32(base.encode()) % len(FALLBACK)]
    return ModeStyle(color, "--" if base != mode else "-")


BLUE = (37, 99, 235)  # the mode predicted this token better than static
RED = (220, 38, 38)  # ... worse
WHITE = (255, 255, 255)


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


def improvement_color(delta: float, scale: float) -> str:
    """'#rrggbb' from white (delta = 0) to blue (mode better by >= scale nats) or red (worse)."""
    if not math.isfinite(delta):
        return "#%02x%02x%02x" % RED
    end = BLUE if delta > 0 else RED
    f = min(abs(delta) / scale, 1.0)
    return "#" + "".join(f"{round(w + (e - w) * f):02x}" for w, e in zip(WHITE, end))


OUTLIER_K = 3.0  # a value beyond this many interquartile ranges outside the quartiles is off-scale


def robust_limits(series, k: float = OUTLIER_K, pad: float = 0.08, include=(0.0,),
                  keep: float = 1.5) -> tuple[float, float]:
    """Axis limits that show the bulk of every series rather than its outliers: per series, the range of
    its finite values within [q25 - k * IQR, q75 + k * IQR] (Tukey's fences; all of them when IQR is 0);
    the union over the series and the values in `include`, widened by `pad` of the span on each side.
    The full range of the data where that is at most `keep` times as wide (nothing worth clipping); a
    lone spike (a title token at an article start, a diverging step) no longer sets the scale, and
    `_mark_off_scale` shows where it went."""
    lo, hi, full = list(include), list(include), list(include)
    for s in series:
        v = np.asarray(s, dtype=np.float64)
        v = v[np.isfinite(v)]
        if not v.size:
            continue
        full += [v.min(), v.max()]
        q1, q3 = np.percentile(v, [25, 75])
        if q3 > q1:
            v = v[(v >= q1 - k * (q3 - q1)) & (v <= q3 + k * (q3 - q1))]
        lo.append(v.min())
        hi.append(v.max())
    if len(full) == len(include):  # no finite value at all
        return -1.0, 1.0
    a, b = float(min(lo)), float(max(hi))
    if max(full) - min(full) <= keep * (b - a):
        a, b = float(min(full)), float(max(full))
    span = b - a if b > a else max(abs(a), 1.0)
    return a - pad * span, b + pad * span


def _signed(v: float, unit: str = "") -> str:
    """+0.657, -2.95, +1,820, +inf: three significant digits without an exponent, then the unit."""
    return (f"{v:+,.0f}" if math.isfinite(v) and abs(v) >= 1000 else f"{v:+.3g}") + unit


def _mark_off_scale(ax, x, y, lo: float, hi: float, color, unit: str = "") -> str:
    """Triangles on the top (bottom) edge of `ax` at the peak of every run of points above `hi` (below
    `lo`); returns a legend note ('' when everything is on scale)."""
    x, y = np.asarray(x), np.asarray(y, dtype=np.float64)
    notes = []
    for side, out, extreme, marker, edge in (("▲", y > hi, np.argmax, "^", 0.985),
                                             ("▼", y < lo, np.argmin, "v", 0.015)):
        if not out.any():
            continue
        idx = np.flatnonzero(out)
        runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
        at = [r[extreme(y[r])] for r in runs]
        ax.plot(x[at], np.full(len(at), edge), linestyle="none", marker=marker, markersize=6, color=color,
                markeredgecolor="black", markeredgewidth=0.5, clip_on=False, transform=ax.get_xaxis_transform())
        notes.append(f"{side}{len(runs)} to {_signed(y[at].max() if side == '▲' else y[at].min(), unit)}")
    return "off-scale " + ", ".join(notes) if notes else ""


def _label(text: str) -> str:
    """Data (mode names, titles) as literal matplotlib text: '$' would start mathtext and a leading '_'
    hides a legend entry."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _with_note(label: str, note: str) -> str:
    return f"{_label(label)} ({note})" if note else _label(label)


def _letters(i: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA: the paper's article names."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


# --- figures -------------------------------------------------------------------------------------

def _legend_below(fig: Figure, handles, labels) -> None:
    """The legend under the axes, outside them, so it never covers a curve; as many columns as fit."""
    fig.legend(handles, labels, loc="outside lower center", frameon=False, fontsize=9,
               ncols=max(1, min(len(labels), 130 // (max(map(len, labels), default=0) + 6))))


def plot_improvement(curve: dict, path: Path) -> Figure:
    fig = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    x = np.asarray(curve["bin_start"]) + curve["bin_width"] / 2
    lo, hi = robust_limits(curve["improvement"].values())  # a bin of a few tokens must not set the scale
    counts = ax.twinx()  # how many articles reach each bin: the tail is a few articles only
    counts.step(x, curve["n_articles"], where="mid", color=COUNTS_COLOR, linewidth=1, label="articles in bin "
                                                                                             "(right axis)")
    counts.set_ylabel("articles in bin", color=COUNTS_COLOR)
    counts.set_ylim(bottom=0)
    counts.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_zorder(counts.get_zorder() + 1)  # the curves above the counts' steps
    ax.patch.set_visible(False)
    ax.axhline(0, color="black", linewidth=0.8)
    for mode, y in curve["improvement"].items():
        style = mode_style(mode)
        line, = ax.plot(x, y, marker="o", markersize=3, color=style.color, linestyle=style.linestyle)
        line.set_label(_with_note(mode, _mark_off_scale(ax, x, y, lo, hi, style.color, " nats")))
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"position in article (tokens, bins of {curve['bin_width']})")
    ax.set_ylabel("static NLL − mode NLL (nats/token)")
    ax.set_title("Loss improvement over static vs position (higher = mode better)")
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = counts.get_legend_handles_labels()
    _legend_below(fig, handles + more, labels + more_labels)
    fig.savefig(path)
    return fig


STREAM_LABEL_CHARS = 150  # characters of 8-pt article label that fit across the stream figure's axes


def stream_improvement(t: TokenTable, n_articles: int, window: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The curves of stream.png: (token offsets of the first `n_articles` articles' starts, then their
    end; mode -> static NLL - mode NLL in nats, trailing mean over `window` tokens within each article)."""
    starts = t.starts[: min(n_articles, t.n_articles) + 1]
    end = int(starts[-1])
    return starts, {m: trailing_mean(t.improvement(m)[:end], starts, window) for m in t.modes}


WIKITEXT_MARKS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" ,", ","), (" .", "."), ("( ", "("),
                  (" )", ")"), (" 's", "'s"), (" :", ":"), (" ;", ";"))


def display_title(title: str) -> str:
    """A title as a reader writes it: WikiText's tokenised markers joined back ('M @-@ 82 ( Michigan
    highway )' -> 'M-82 (Michigan highway)'); a title the vocabulary does not hold says so."""
    for mark, text in WIKITEXT_MARKS:
        title = title.replace(mark, text)
    words = title.split()
    if words and all(w == "<unk>" for w in words):
        return "(title out of vocabulary)"
    return title


def _article_label(i: int, title: str, chars: int) -> str:
    """'A: title', cut to `chars` characters; only the letter where not even a few title characters fit."""
    label = f"{_letters(i)}: {display_title(title)}"
    if len(label) <= chars:
        return label
    return label[: chars - 1] + "…" if chars >= len(_letters(i)) + 5 else _letters(i)


STREAM_ROW_INCHES = 1.0  # height of one mode's panel in stream.png


def _reference_mode(modes: list[str]) -> str | None:
    """The curve drawn in grey in every other panel of stream.png: the learned rule, else the first mode."""
    return next((m for m in modes if m.split("+")[0].split("@")[0] == "learned"), modes[0] if modes else None)


def plot_stream(t: TokenTable, n_articles: int, window: int, path: Path) -> Figure:
    """The paper's figure: the smoothed per-token improvement of every mode along consecutive articles.
    One panel per mode on a shared y-range set by the bulk of the curves (robust_limits; spikes marked
    on the edge), so that modes whose curves nearly coincide (the LSTM-only rules) stay visible; the
    learned rule in grey in the other panels as the reference."""
    starts, curves = stream_improvement(t, n_articles, window)
    end = int(starts[-1])
    lo, hi = robust_limits(curves.values())
    modes = list(curves)
    ref = _reference_mode(modes)
    fig = Figure(figsize=(11, 1.6 + STREAM_ROW_INCHES * max(len(modes), 1)), dpi=110, layout="constrained")
    axes = fig.subplots(max(len(modes), 1), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    x = np.arange(end)
    for row, (ax, mode) in enumerate(zip(axes, modes)):
        for i, (s, e) in enumerate(zip(starts[:-1], starts[1:])):
            if i % 2:
                ax.axvspan(s, e, color="0.93", linewidth=0, zorder=0)
            if i:
                ax.axvline(s, color="grey", linestyle="--", linewidth=0.8)
            if row == 0:
                label = _article_label(i, t.titles[i], int(STREAM_LABEL_CHARS * (e - s) / max(end, 1)))
                ax.text((s + e) / 2, 1.22, _label(label), transform=ax.get_xaxis_transform(), fontsize=8,
                        va="bottom", ha="center", clip_on=False)
        ax.axhline(0, color="black", linewidth=0.6)
        if ref is not None and mode != ref:
            ax.plot(x, curves[ref], linewidth=0.8, color="0.6", zorder=1, label="_reference")
        style = mode_style(mode)
        y = curves[mode]
        line, = ax.plot(x, y, linewidth=1, color=style.color, linestyle=style.linestyle, zorder=2)
        line.set_label(_with_note(mode, _mark_off_scale(ax, x, y, lo, hi, style.color, " nats")))
        ax.set_title(line.get_label(), loc="left", fontsize=9, color=style.color, fontweight="bold", pad=2)
    axes[0].set_xlim(0, max(end, 1))
    axes[0].set_ylim(lo, hi)
    axes[-1].set_xlabel("token in the stream of consecutive articles (A, B, …; dashed: article start)")
    fig.supylabel(f"static NLL − mode NLL (nats/token), trailing mean over {window} tokens within the article",
                  fontsize=9)
    fig.suptitle("Per-token loss improvement over static along the stream (higher = mode better)"
                 + (f"; grey: {ref}" if ref is not None and len(modes) > 1 else ""))
    fig.savefig(path)
    return fig


def bins_around_zero(lo: float, hi: float, n: int) -> np.ndarray:
    """About `n` equal bins over [lo, hi], one of whose edges is 0: no bar straddles 'as good as static'."""
    width = (hi - lo) / n if hi > lo else 1.0
    first = math.floor(lo / width)
    return width * np.arange(first, max(math.ceil(hi / width), first + 1) + 1)  # at least one bin


def plot_histogram(t: TokenTable, path: Path) -> Figure:
    """One small histogram per mode, stacked on a shared x-axis in the mode's colour (overlaid bars, even
    translucent ones, mix into colours no legend has), with a triangle at its foot for every article."""
    changes = {m: 100 * per_article_rel_change(t, m) for m in t.modes}
    lo, hi = robust_limits(changes.values(), pad=0.0)  # one article a mode wrecked must not set the bins
    edges = bins_around_zero(lo, hi, min(30, max(5, t.n_articles)))
    fig = Figure(figsize=(8, 1.2 + 1.1 * len(changes)), dpi=110, layout="constrained")
    axes = fig.subplots(len(changes), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    for ax, (mode, v) in zip(axes, changes.items()):
        style = mode_style(mode)
        on = (v >= lo) & (v <= hi)
        note = f"median {np.median(v):+.1f}%"
        for side, out, extreme in (("▲", v > hi, np.max), ("▼", v < lo, np.min)):  # ±inf: a diverged article
            if out.any():
                note += f", {side}{int(out.sum())} off-scale to {_signed(extreme(v[out]), '%')}"
        ax.hist(v[on], bins=edges, color=style.color, edgecolor="white", linewidth=0.5,
                hatch="//" if style.linestyle == "--" else None, label=_with_note(mode, note))
        ax.plot(v[on], np.zeros(on.sum()), linestyle="none", marker="^", markersize=6, color="black",
                alpha=0.6, markeredgewidth=0, clip_on=False, transform=ax.get_xaxis_transform(),
                label="_articles")  # every article's own value: a few articles make coarse bins
        ax.axvline(0, color="black", linewidth=0.8)
        ax.text(0.01, 0.95, _with_note(mode, note), transform=ax.transAxes, va="top", ha="left", fontsize=9,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=3))
    tallest = max(np.histogram(v[(v >= lo) & (v <= hi)], bins=edges)[0].max() for v in changes.values())
    axes[0].set_ylim(0, max(tallest, 1) * 1.45)  # shared: room for each panel's label above its bars
    axes[-1].set_xlabel("per-article perplexity change vs static (%; negative = mode better; ▲ one article)")
    fig.supylabel("articles", fontsize=10)
    fig.suptitle(f"Per-article relative perplexity change ({t.n_articles} articles)")
    fig.savefig(path)
    return fig


def plot_drift(drift_csv: Path, path: Path) -> Figure:
    """Mean (circles) and max (dotted, triangles) over streams of each adaptive mode's drift, in the
    mode's colour; markers at the measurements, which are few on short articles."""
    with open_csv(drift_csv) as f:
        rows = list(csv.DictReader(f))
    series = {}  # mode -> (tokens read, mean drift, max drift)
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        series[mode] = tuple(np.array([float(r[c]) for r in mine])
                             for c in ("tokens_read", "drift_mean", "drift_max"))
    lo, hi = robust_limits([y for _, mean, mx in series.values() for y in (mean, mx)])
    fig = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for mode, (xs, mean, mx) in series.items():
        style = mode_style(mode)
        c = style.color
        face = "white" if style.linestyle == "--" else c  # MODE+cache: MODE's colour, dashed, hollow markers
        ax.plot(xs, mean, color=c, linestyle=style.linestyle, marker="o", markersize=4, markerfacecolor=face,
                label=_with_note(f"{mode}, mean over streams", _mark_off_scale(ax, xs, mean, lo, hi, c)))
        ax.plot(xs, mx, linestyle=":", color=c, marker="^", markersize=4, markerfacecolor=face,
                label=_with_note(f"{mode}, max over streams", _mark_off_scale(ax, xs, mx, lo, hi, c)))
    ax.set_ylim(lo, hi)
    ax.set_xlabel("tokens read")
    ax.set_ylabel("||theta - theta0|| / ||theta0||")
    ax.set_title("Weight drift of the adapted weights while reading")
    _legend_below(fig, *ax.get_legend_handles_labels())
    fig.savefig(path)
    return fig


# --- HTML heat-map -------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em auto;max-width:60em;color:#111;line-height:1.7}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.5em} h3{font-size:1em;margin-bottom:.2em}
.legend span,.tokens span{padding:0 1px;border-radius:2px}
.tokens{font-family:Georgia,serif;font-size:15px;white-space:normal;word-wrap:break-word}
.meta{color:#555;font-weight:normal;font-size:.9em}
.picker label{margin-right:1em;cursor:pointer;padding:.2em .5em;border:1px solid #bbb;border-radius:4px}
.picker input{margin-right:.2em}
section.mode{display:none}
"""


def _token_display(text: str, t: TokenTable) -> str:
    """Escaped token text as it reads in running prose; <eos> becomes a visible line end."""
    if text == t.eos_text:
        return "⏎"
    if t.tokenizer_kind == "sentencepiece":
        return html.escape(text.replace("▁", " "))
    return html.escape(text) + " "


def _select_articles(t: TokenTable, mode: str | None, cfg: ReportConfig) -> list[int]:
    k = min(cfg.html_articles, t.n_articles)
    if cfg.html_select == "gain" and mode is not None:
        # largest mean per-token improvement first
        gain = -per_article_rel_change(t, mode)
        return [int(i) for i in np.argsort(-gain, kind="stable")[:k]]
    return list(range(k))


def _article_html(t: TokenTable, a: int, mode: str | None, cfg: ReportConfig) -> str:
    s, e = int(t.starts[a]), int(t.starts[a + 1])
    shown = min(e - s, cfg.html_max_tokens)
    static = t.nll["static"][s:e]
    ppl_static = perplexity(float(static.sum()), e - s)
    meta = f"{e - s} tokens, static ppl {ppl_static:.2f}"
    if mode is not None:
        ppl_mode = perplexity(float(t.nll[mode][s:e].sum()), e - s)
        meta += f", {html.escape(mode)} ppl {ppl_mode:.2f} ({100 * (ppl_mode / ppl_static - 1):+.1f}%)"
    if shown < e - s:
        meta += f"; first {shown} tokens shown"
    spans = []
    for i in range(s, s + shown):
        text = _token_display(t.text[i], t)
        if mode is None:
            tip, colour = f"static {t.nll['static'][i]:.3f} nats", improvement_color(0.0, cfg.color_scale)
        else:
            d = t.nll["static"][i] - t.nll[mode][i]
            tip = f"static {t.nll['static'][i]:.3f} · {mode} {t.nll[mode][i]:.3f} nats · Δ {d:+.3f}"
            colour = improvement_color(d, cfg.color_scale)
        spans.append(f'<span style="background:{colour}" title="{html.escape(tip, quote=True)}">{text}</span>')
        if t.text[i] == t.eos_text:
            spans.append("<br>")
    return (f'<article><h3>{_letters(a)}. {html.escape(t.titles[a])} '
            f'<span class="meta">({meta})</span></h3>\n<p class="tokens">{"".join(spans)}</p></article>')


def most_improved(t: TokenTable) -> str:
    """The mode with the largest mean improvement over static per token (non-finite ones last)."""
    gain = {m: float(np.mean(t.improvement(m))) for m in t.modes}
    return max(t.modes, key=lambda m: gain[m] if math.isfinite(gain[m]) else -math.inf)


def render_heatmap(t: TokenTable, cfg: ReportConfig, path: Path) -> None:
    modes = t.modes
    legend = (f'<p class="legend">Each token is coloured by static NLL − mode NLL: '
              f'<span style="background:{improvement_color(cfg.color_scale, cfg.color_scale)}">blue</span> = '
              f'the mode predicted it better, <span style="background:{improvement_color(-cfg.color_scale, cfg.color_scale)}">'
              f'red</span> = worse, white = equal (full colour at ±{cfg.color_scale:g} nats). Hover a token for both '
              f'NLLs. ⏎ marks a line end.</p>')
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>dynlm: per-token loss improvement over static</title>", f"<style>{CSS}"]
    if not modes:
        parts += ["section.mode{display:block}</style></head><body>",
                  "<h1>Per-token NLL (static only)</h1>",
                  "<p><strong>Only the static mode was evaluated: there is nothing to compare against.</strong> "
                  "Hover a token for its static NLL.</p>",
                  '<section class="mode">',
                  *(_article_html(t, a, None, cfg) for a in _select_articles(t, None, cfg)), "</section>"]
    else:
        # a mode picker without JavaScript: radio buttons + the :checked sibling selector
        parts.append("".join(f"#pick-{i}:checked~#mode-{i}{{display:block}}"
                             f'#pick-{i}:checked~.picker label[for="pick-{i}"]{{background:#dbeafe}}'
                             for i in range(len(modes))))
        parts += ["</style></head><body>", "<h1>Per-token loss improvement over static</h1>", legend]
        first = most_improved(t)  # opens on a mode that changed something, not one that may be all white
        parts += [f'<input type="radio" name="mode" id="pick-{i}" hidden{" checked" if m == first else ""}>'
                  for i, m in enumerate(modes)]
        parts.append('<div class="picker">Mode: ' + "".join(
            f'<label for="pick-{i}">{html.escape(m)}</label>' for i, m in enumerate(modes)) + "</div>")
        for i, mode in enumerate(modes):
            parts.append(f'<section class="mode" id="mode-{i}"><h2>{html.escape(mode)} vs static</h2>')
            parts += [_article_html(t, a, mode, cfg) for a in _select_articles(t, mode, cfg)]
            parts.append("</section>")
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts), encoding="utf-8")


# --- entry points --------------------------------------------------------------------------------

def write_curve_csv(curve: dict, path: Path) -> None:
    modes = list(curve["improvement"])
    with open_csv(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["bin_start", "bin_end", "n_tokens", "n_articles", *modes])
        for k, start in enumerate(curve["bin_start"]):
            w.writerow([start, start + curve["bin_width"], curve["n_tokens"][k], curve["n_articles"][k],
                        *(curve["improvement"][m][k] for m in modes)])


def render_report(eval_dir: Path, cfg: ReportConfig | None = None) -> Report:
    """Write the report files into `eval_dir`; return what was written (for the trackers)."""
    cfg = cfg or ReportConfig()  # its values were checked when it was built (config.py)
    eval_dir = Path(eval_dir)
    t = load_tokens(eval_dir)
    report = Report(eval_dir, t.modes, per_article=per_article_results(eval_dir, t))
    report.files["heatmap"] = eval_dir / "heatmap.html"
    render_heatmap(t, cfg, report.files["heatmap"])
    if not t.modes:
        report.message = (f"only 'static' in {eval_dir / 'tokens.parquet'}: nothing to compare against; "
                          f"wrote heatmap.html with the static NLLs, no improvement plots")
        return report
    report.curve = improvement_by_position(t, cfg.bin_width)
    report.files["curve"] = eval_dir / "improvement_by_position.csv"
    write_curve_csv(report.curve, report.files["curve"])
    for name, draw in (("improvement", lambda p: plot_improvement(report.curve, p)),
                       ("stream", lambda p: plot_stream(t, cfg.stream_articles, cfg.smooth_window, p)),
                       ("histogram", lambda p: plot_histogram(t, p))):
        report.files[name] = eval_dir / f"{name}.png"
        draw(report.files[name])
    if (eval_dir / "drift.csv").exists():
        report.files["drift"] = eval_dir / "drift.png"
        plot_drift(eval_dir / "drift.csv", report.files["drift"])
    report.message = f"report for {', '.join(t.modes)} vs static over {t.n_articles} articles"
    return report


def log_report(tracker, report: Report) -> None:
    """The evaluation dashboard: per-article table, improvement curve, heat-map and figures."""
    columns, rows = report.per_article
    if rows:
        tracker.log_table("eval/per_article", columns, rows)
    if report.curve is not None:
        c = report.curve
        xs = [s + c["bin_width"] / 2 for s in c["bin_start"]]
        tracker.log_line_plot("eval/improvement_vs_position", xs, c["improvement"], xname="position in article",
                              title="static NLL - mode NLL (nats/token) vs position")
    if "heatmap" in report.files:
        tracker.log_html("eval/heatmap", report.files["heatmap"])
    for name in ("improvement", "stream", "histogram", "drift"):
        if name in report.files:
            tracker.log_image(f"eval/{name}", report.files[name])
