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

from pathlib import Path


from ..config import ReportConfig
from .heatmap import render_heatmap
from .plots import plot_drift, plot_histogram, plot_improvement, plot_stream
from .tables import Report, improvement_by_position, load_tokens, per_article_results, write_curve_csv

def render_report(eval_dir: Path, cfg: ReportConfig | None = None) -> Report:
    """Write the report files into `eval_dir`; return what was written (for the trackers)."""
    cfg = cfg or ReportConfig()  # its values were checked when it was built (config/schema.py)
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
