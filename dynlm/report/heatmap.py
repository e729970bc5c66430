"""heatmap.html: selected articles, every token coloured by its improvement over static."""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from ..config import ReportConfig
from ..prequential import perplexity
from .style import _letters, improvement_color
from .tables import TokenTable, per_article_rel_change

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
