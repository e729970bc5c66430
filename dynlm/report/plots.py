"""The report's figures: improvement by position, the stream along articles (the paper's figure),
the per-article histogram and the weight drift."""
from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend, Agg canvas
from matplotlib.ticker import MaxNLocator

from ..textio import open_csv
from .style import (COUNTS_COLOR, _article_label, _label, _legend_below, _mark_off_scale, _signed, _with_note,
                    mode_style, robust_limits)
from .tables import TokenTable, per_article_rel_change, trailing_mean

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
    label = f"static NLL − mode NLL (nats/token), trailing mean over {window} tokens within the article"
    # wrapped to the figure's height (about 14 characters of 9-pt text per inch): one panel is short
    fig.supylabel("\n".join(textwrap.wrap(label, max(24, int(fig.get_figheight() * 14)))), fontsize=9)
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
