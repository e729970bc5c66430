"""How modes look in every plot (a colour per mode, dashed `+cache`), the improvement colours, and
the axis limits set by the bulk of the data rather than its outliers."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend, Agg canvas



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
