"""`dynlm report`: the numbers behind the plots, the HTML heat-map, and clear errors."""
import csv
import html
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.colors
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynlm.cli import main
from dynlm.config import ReportConfig
from dynlm.report import render_report
from dynlm.report.plots import bins_around_zero, plot_drift, plot_histogram, plot_improvement, plot_stream, stream_improvement
from dynlm.report.style import BLUE, RED, improvement_color, mode_style, robust_limits
from dynlm.report.tables import improvement_by_position, load_tokens, trailing_mean

TRICKY = ["<script>alert(1)</script>", "a&b", '"quoted"', "<eos>"]  # must come out escaped


def write_eval_dir(d: Path, lengths=(130, 75, 210), modes=("sgd", "dyneval"), seed=0, titles=None) -> dict:
    """A hand-made evaluation directory as `dynlm evaluate` writes it: tokens.parquet + per_article.csv."""
    rng = np.random.default_rng(seed)
    ids = [f"art-{i}" for i in range(len(lengths))]
    titles = titles or [f"Title {i}" for i in range(len(lengths))]
    n = sum(lengths)
    cols = {"article_id": [a for a, k in zip(ids, lengths) for _ in range(k)],
            "position": np.concatenate([np.arange(k) for k in lengths]),
            "token": rng.integers(0, 50, n)}
    cols["text"] = [TRICKY[i % len(TRICKY)] if i % 7 == 0 else f"w{t}" for i, t in enumerate(cols["token"])]
    cols["nll_static"] = rng.uniform(1, 8, n)
    for m in modes:
        cols[f"nll_{m}"] = cols["nll_static"] - rng.normal(0.3, 1.0, n)
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, metadata={"dynlm.tokenizer": "word", "dynlm.eos_text": "<eos>"}),
                   d / "tokens.parquet")
    with open(d / "per_article.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "article_id", "title", "n_tokens", "nll_sum", "ppl"])
        for m in ("static", *modes):
            for a, title, k in zip(ids, titles, lengths):
                w.writerow([m, a, title, k, 0.0, 1.0])  # only titles are read from here
    return cols


class Spans(HTMLParser):
    """(background colour, tooltip, text) of every token span, per mode section."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, list] = {}
        self._section = self._span = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._section = self.sections.setdefault(a.get("id", "static"), [])
        elif tag == "span" and "title" in a and self._section is not None:
            self._span = [a["style"].removeprefix("background:"), a["title"], ""]
            self._section.append(self._span)

    def handle_data(self, data):
        if self._span is not None:
            self._span[2] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None


def parse_spans(path: Path) -> dict[str, list]:
    p = Spans()
    p.feed(path.read_text(encoding="utf-8"))
    return p.sections


def rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def test_binned_improvement_matches_a_direct_computation(tmp_path):
    cols = write_eval_dir(tmp_path)
    width = 40
    report = render_report(tmp_path, ReportConfig(bin_width=width))
    # direct: group (static - mode) by position // width over all tokens, with plain python
    for mode in ("sgd", "dyneval"):
        groups: dict[int, list] = {}
        for a, p, s, m in zip(cols["article_id"], cols["position"], cols["nll_static"], cols[f"nll_{mode}"]):
            groups.setdefault(int(p) // width, []).append((a, s - m))
        assert report.curve["bin_start"] == [k * width for k in sorted(groups)]
        expected = [np.mean([d for _, d in groups[k]]) for k in sorted(groups)]
        np.testing.assert_allclose(report.curve["improvement"][mode], expected, rtol=1e-12)
        assert report.curve["n_tokens"] == [len(groups[k]) for k in sorted(groups)]
        assert report.curve["n_articles"] == [len({a for a, _ in groups[k]}) for k in sorted(groups)]
    # the csv holds the same numbers
    rows = list(csv.DictReader(open(tmp_path / "improvement_by_position.csv")))
    np.testing.assert_allclose([float(r["dyneval"]) for r in rows], report.curve["improvement"]["dyneval"])


def test_articles_split_on_id_change_and_position_reset(tmp_path):
    # two consecutive articles that share an id (WikiText has repeated titles) are still two articles
    d = tmp_path / "e"
    d.mkdir()
    pq.write_table(pa.table({"article_id": ["x"] * 5 + ["x"] * 3 + ["y"] * 2,
                             "position": [0, 1, 2, 3, 4, 0, 1, 2, 0, 1],
                             "nll_static": np.ones(10), "nll_sgd": np.zeros(10)}), d / "tokens.parquet")
    t = load_tokens(d)
    assert t.starts.tolist() == [0, 5, 8, 10] and t.article_ids == ["x", "x", "y"]
    assert t.text[0] == "?"  # an old file without text/token columns still renders


def test_trailing_mean_never_crosses_an_article_start():
    x = np.array([1.0, 3.0, 5.0, 7.0, 100.0, 200.0])
    starts = np.array([0, 4, 6])
    got = trailing_mean(x, starts, window=2)
    np.testing.assert_allclose(got, [1, 2, 4, 6, 100, 150])


def test_report_files_exist_and_are_not_trivial(tmp_path):
    write_eval_dir(tmp_path)
    report = render_report(tmp_path, ReportConfig(html_articles=2, stream_articles=3))
    import matplotlib.image as mpimg

    for name in ("improvement", "stream", "histogram"):
        path = report.files[name]
        assert path == tmp_path / f"{name}.png" and path.read_bytes()[:4] == b"\x89PNG"
        pixels = mpimg.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600
        assert pixels[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    sections = parse_spans(report.files["heatmap"])
    assert set(sections) == {"mode-0", "mode-1"}  # sgd, dyneval
    assert len(sections["mode-0"]) == 130 + 75  # every token of the first two articles
    page = report.files["heatmap"].read_text()
    assert "Title 0" in page and "Title 1" in page and "Title 2" not in page
    # self-contained: nothing fetched from anywhere, no scripts
    assert "<script" not in page and "src=" not in page and "http" not in page and "<link" not in page


def test_html_escapes_tokens_and_titles(tmp_path):
    write_eval_dir(tmp_path, titles=["Fish & <Chips>", "b", "c"])
    page = render_report(tmp_path, ReportConfig(html_articles=1)).files["heatmap"].read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a&amp;b" in page and "&quot;quoted&quot;" in page
    assert "Fish &amp; &lt;Chips&gt;" in page and "<Chips>" not in page
    texts = [text for _, _, text in parse_spans(tmp_path / "heatmap.html")["mode-0"]]
    assert "<script>alert(1)</script> " in texts and "a&b " in texts  # unescaped back by the parser


def test_token_colours_white_blue_red(tmp_path):
    assert improvement_color(0.0, 1.0) == "#ffffff"
    assert rgb(improvement_color(5.0, 1.0)) == BLUE and rgb(improvement_color(-5.0, 1.0)) == RED
    half = rgb(improvement_color(0.5, 1.0))
    assert half not in (BLUE, (255, 255, 255)) and all(b <= h <= 255 for b, h in zip(BLUE, half))

    d = tmp_path / "e"
    d.mkdir()
    static = np.array([2.0, 2.0, 2.0, 2.0])
    mode = np.array([2.0, 1.0, 3.5, 2.0])  # equal, better, worse, equal
    pq.write_table(pa.table({"article_id": ["a"] * 4, "position": np.arange(4), "text": ["eq", "up", "down", "eq2"],
                             "nll_static": static, "nll_dyn": mode}), d / "tokens.parquet")
    spans = parse_spans(render_report(d, ReportConfig(color_scale=2.0)).files["heatmap"])["mode-0"]
    colour = {text.strip(): rgb(c) for c, _, text in spans}
    assert colour["eq"] == colour["eq2"] == (255, 255, 255)
    r, g, b = colour["up"]
    assert b > r and b > g and colour["up"] != (255, 255, 255)  # blue: dynamic better
    r, g, b = colour["down"]
    assert r > b and r > g and colour["down"] != (255, 255, 255)  # red: dynamic worse
    tips = {text.strip(): tip for _, tip, text in spans}
    assert "static 2.000" in tips["up"] and "dyn 1.000" in tips["up"] and "+1.000" in tips["up"]


def test_select_articles_with_largest_gain(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    gains = [0.1, 0.9, 0.5]  # mean improvement per article
    n = 6
    pq.write_table(pa.table({"article_id": [f"a{i}" for i in range(3) for _ in range(n)],
                             "position": np.tile(np.arange(n), 3), "nll_static": np.full(3 * n, 3.0),
                             "nll_dyn": np.repeat([3.0 - g for g in gains], n)}), d / "tokens.parquet")
    page = render_report(d, ReportConfig(html_articles=2, html_select="gain")).files["heatmap"].read_text()
    assert re.findall(r"<h3>[A-Z]+\. (\S+) ", page) == ["a1", "a2"]


def test_static_only_says_there_is_nothing_to_compare(tmp_path, capsys):
    write_eval_dir(tmp_path, modes=())
    assert main(["report", "--eval", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nothing to compare" in out
    assert not list(tmp_path.glob("*.png"))
    page = (tmp_path / "heatmap.html").read_text()
    assert "nothing to compare" in page
    spans = parse_spans(tmp_path / "heatmap.html")["static"]
    assert spans and all(c == "#ffffff" and t.startswith("static ") for c, t, _ in spans)


def test_report_cli_writes_files_and_takes_overrides(tmp_path, capsys):
    write_eval_dir(tmp_path)
    assert main(["report", "--eval", str(tmp_path), "--report.bin_width=100"]) == 0
    assert "improvement.png" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "improvement_by_position.csv")))
    assert [int(r["bin_start"]) for r in rows] == [0, 100, 200]


def test_report_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["report", "--eval", str(tmp_path / "nowhere")]) == 2
    assert "tokens.parquet not found" in capsys.readouterr().err
    (tmp_path / "tokens.parquet").write_text("not parquet")
    assert main(["report", "--eval", str(tmp_path)]) == 2
    assert "not a readable parquet" in capsys.readouterr().err
    pq.write_table(pa.table({"article_id": ["a"], "position": [0], "nll_sgd": [1.0]}), tmp_path / "tokens.parquet")
    assert main(["report", "--eval", str(tmp_path)]) == 2
    assert "nll_static" in capsys.readouterr().err
    write_eval_dir(tmp_path)
    assert main(["report", "--eval", str(tmp_path), "--report.html_select=best"]) == 2
    assert "html_select" in capsys.readouterr().err
    assert main(["report", "--eval", str(tmp_path), "--report.bin_width=0"]) == 2
    assert "bin_width" in capsys.readouterr().err


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p),
                None)


# Chromium lines that concern the page itself (console messages, JS errors, failed loads); the
# rest of its stderr is sandbox/dbus/GPU noise of a headless container.
PAGE_ERRORS = ("CONSOLE", "Uncaught", "ERR_", "Failed to load", "heatmap.html")


def test_heatmap_renders_in_headless_chromium(tmp_path):
    if find_chromium() is None:  # CI (.ci/run) installs Chromium and sets DYNLM_REQUIRE_BROWSER: never a silent skip
        if os.environ.get("DYNLM_REQUIRE_BROWSER"):
            pytest.fail("DYNLM_REQUIRE_BROWSER is set but no chromium binary was found (apt-get install chromium)")
        pytest.skip("no chromium binary found (apt-get install chromium)")
    write_eval_dir(tmp_path)
    page = render_report(tmp_path, ReportConfig(html_articles=2)).files["heatmap"]
    expected = parse_spans(page)
    proc = subprocess.run(
        [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--user-data-dir=" + str(tmp_path / "profile"), "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=300)  # a cold headless start on a loaded machine
    assert proc.returncode == 0, proc.stderr[-2000:]
    page_errors = [line for line in proc.stderr.splitlines() if any(s in line for s in PAGE_ERRORS)]
    assert not page_errors, page_errors
    # the DOM chromium built holds every token span, with its colour and tooltip, in each section
    rendered = Spans()
    rendered.feed(proc.stdout)
    assert rendered.sections == expected and sum(map(len, expected.values())) == 2 * (130 + 75)
    assert html.escape("<script>alert(1)</script>") in proc.stdout


def test_sentencepiece_pieces_read_as_prose_and_long_articles_are_cut(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    pieces = ["▁The", "▁cat", "s", "▁sat", "</s>"] * 4
    pq.write_table(pa.table({"article_id": ["a"] * 20, "position": np.arange(20), "text": pieces,
                             "nll_static": np.ones(20), "nll_dyn": np.ones(20)},
                            metadata={"dynlm.tokenizer": "sentencepiece", "dynlm.eos_text": "</s>"}),
                   d / "tokens.parquet")
    path = render_report(d, ReportConfig(html_max_tokens=7)).files["heatmap"]
    texts = [text for _, _, text in parse_spans(path)["mode-0"]]
    assert texts == [" The", " cat", "s", " sat", "⏎", " The", " cat"]  # '▁' is a space; </s> a line end
    assert "first 7 tokens shown" in path.read_text()


def test_a_diverged_mode_reports_infinite_perplexity_not_an_overflow(tmp_path):
    """A rule whose weights blew up (e.g. dyneval on all weights at too large a rate) scores NLLs
    whose exp overflows: perplexities are inf, and the report still renders."""
    from dynlm.prequential import perplexity
    assert perplexity(2000.0, 2) == float("inf") and perplexity(10.0, 5) == pytest.approx(np.exp(2.0))
    d = tmp_path / "eval"
    cols = write_eval_dir(d, modes=("dyneval",))
    table = pq.read_table(d / "tokens.parquet")
    diverged = np.asarray(cols["nll_static"]) + 2000.0
    pq.write_table(table.set_column(table.column_names.index("nll_dyneval"), "nll_dyneval", pa.array(diverged)),
                   d / "tokens.parquet")
    report = render_report(d)
    assert (d / "heatmap.html").is_file() and "dyneval ppl inf" in (d / "heatmap.html").read_text()
    assert report.files


def test_robust_limits_keep_clean_data_and_drop_a_lone_spike():
    lo, hi = robust_limits([np.linspace(-1, 2, 50)])  # nothing to clip: the full range, padded
    assert lo == pytest.approx(-1 - 0.08 * 3) and hi == pytest.approx(2 + 0.08 * 3)
    rng = np.random.default_rng(0)
    bulk = rng.normal(0.3, 0.2, 500)
    lo, hi = robust_limits([np.append(bulk, 8000.0), bulk - 0.1])  # the ~8000 of issue 13
    assert bulk.min() - 0.1 - 0.5 < lo <= bulk.min() - 0.1 and bulk.max() <= hi < bulk.max() + 0.5
    assert robust_limits([[5.0, 6.0]])[0] < 0  # zero (the "as good as static" line) is always on the axis
    assert robust_limits([[np.nan, np.inf, -np.inf]]) == robust_limits([]) == (-1.0, 1.0)
    lo, hi = robust_limits([[0.0] * 10 + [0.5]])  # zero IQR: nothing is an outlier
    assert lo < 0 < 0.5 < hi


def test_stream_y_range_ignores_a_huge_spike_at_an_article_start(tmp_path):
    """Issue 13: one token the static model found absurd at an article start (a title, a rare name)
    gave stream.png a y-axis up to ~8,000 and flattened every curve on zero."""
    cols = write_eval_dir(tmp_path, lengths=(300, 250, 350), modes=("dyneval@lstm", "learned+cache"))
    clean = load_tokens(tmp_path)
    _, bulk = stream_improvement(clean, 3, 50)  # the curves without the spike
    bulk = np.concatenate(list(bulk.values()))
    lo_b, hi_b = bulk.min(), bulk.max()
    cols["nll_static"][300] += 8000.0  # first token of article B
    pq.write_table(pa.table(cols), tmp_path / "tokens.parquet")
    t = load_tokens(tmp_path)
    _, spiked = stream_improvement(t, 3, 50)
    assert max(y.max() for y in spiked.values()) > 150  # the spike is in the curves (8000 / 50 tokens)

    fig = plot_stream(t, 3, 50, tmp_path / "stream.png")
    ax = fig.axes[0]  # one panel per mode, one y-range for all
    assert len(fig.axes) == 2 and all(a.get_ylim() == ax.get_ylim() for a in fig.axes)
    lo, hi = ax.get_ylim()
    span = hi_b - lo_b
    assert lo_b - 0.5 * span <= lo <= 0 <= hi <= hi_b + 0.5 * span  # set by the data without the spike
    p5, p95 = np.percentile(bulk, [5, 95])
    assert lo < p5 and p95 < hi  # the bulk of every curve is on the axis
    labels = [a.get_title(loc="left") for a in fig.axes]
    assert len(labels) == 2  # each panel names where the spike went: 'mode (off-scale ▲1 to +7,999 nats)'
    assert all(float(re.search(r"off-scale ▲\d+ to \+([\d,.]+) nats", label)[1].replace(",", "")) > 7000
               for label in labels)
    assert labels[0].startswith("dyneval@lstm") and labels[1].startswith("learned+cache")
    assert "nats" in fig.get_supylabel() and "50 tokens" in fig.get_supylabel()
    assert [text.get_text() for text in ax.texts if ": " in text.get_text()] == ["A: Title 0", "B: Title 1",
                                                                                 "C: Title 2"]
    # the learned rule is the grey reference in every other panel: it is never hidden under a baseline
    ref = [[line for line in a.get_lines() if line.get_label() == "_reference"] for a in fig.axes]
    assert [len(r) for r in ref] == [1, 0] and "grey: learned+cache" in fig.get_suptitle()
    assert (tmp_path / "stream.png").read_bytes()[:4] == b"\x89PNG"


def test_histogram_and_drift_ranges_ignore_one_wrecked_value(tmp_path):
    cols = write_eval_dir(tmp_path, lengths=(60,) * 10, modes=("sgd",))
    cols["nll_sgd"][540:] += 3.0  # the last article: perplexity x20
    pq.write_table(pa.table(cols), tmp_path / "tokens.parquet")
    ax = plot_histogram(load_tokens(tmp_path), tmp_path / "histogram.png").axes[0]
    assert ax.get_xlim()[1] < 200  # %, not the +1,900% of the one wrecked article
    assert "▲1 off-scale to +" in ax.texts[0].get_text()  # each panel names its mode and its outliers

    with open(tmp_path / "drift.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "tokens_read", "drift_mean", "drift_max"])
        w.writerows(["dyneval@lstm", 100 * i, 0.01 * i, 0.02 * i + (40.0 if i == 7 else 0.0)] for i in range(1, 21))
    fig = plot_drift(tmp_path / "drift.csv", tmp_path / "drift.png")
    assert fig.axes[0].get_ylim()[1] < 1.0
    assert [text.get_text() for text in fig.legends[0].get_texts()] == [
        "dyneval@lstm, mean over streams", "dyneval@lstm, max over streams (off-scale ▲1 to +40.1)"]


def test_mode_names_with_at_plus_dollar_underscore_render(tmp_path):
    modes = ("dyneval@lstm", "learned+cache", "cost$x$", "_private")
    write_eval_dir(tmp_path, modes=modes, titles=["The $64,000 Question", "b", "c"])
    report = render_report(tmp_path, ReportConfig(stream_articles=3))
    assert report.modes == list(modes)
    assert all(report.files[name].read_bytes()[:4] == b"\x89PNG" for name in ("improvement", "stream", "histogram"))
    assert list(csv.reader(open(report.files["curve"])))[0][4:] == list(modes)
    fig = plot_stream(load_tokens(tmp_path), 3, 50, tmp_path / "s.png")
    texts = [a._left_title for a in fig.axes]
    assert len(texts) == 4  # one panel per mode, each named
    # drawn literally: no mathtext for '$'
    shown = [tx._preprocess_math(tx.get_text())[0].split(" (")[0].strip() for tx in texts]
    assert shown == list(modes)
    title = fig.axes[0].texts[0]
    assert title._preprocess_math(title.get_text()) == ("A: The $64,000 Question", False)


def write_drift(d: Path, modes) -> None:
    with open(d / "drift.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "tokens_read", "drift_mean", "drift_max"])
        w.writerows([m, 200 * i, 0.01 * i * (k + 1), 0.02 * i * (k + 1)] for k, m in enumerate(modes) for i in (1, 2))


def test_a_mode_keeps_its_colour_in_every_plot_and_every_report(tmp_path):
    """Issue 17: cache was green in one report and orange in another, where orange also meant sgd."""
    colours = {}
    for name, modes in (("two", ("cache", "sgd")), ("five", ("sgd", "dyneval", "learned", "cache", "learned+cache"))):
        d = tmp_path / name
        write_eval_dir(d, modes=modes)
        write_drift(d, modes)
        t = load_tokens(d)
        figures = {"improvement": plot_improvement(improvement_by_position(t, 50), d / "i.png"),
                   "stream": plot_stream(t, 3, 50, d / "s.png"), "histogram": plot_histogram(t, d / "h.png"),
                   "drift": plot_drift(d / "drift.csv", d / "d.png")}
        for plot, fig in figures.items():
            for ax in fig.axes:
                for artist in [*ax.get_lines(), *ax.patches]:
                    mode = artist.get_label().split(" (")[0].split(",")[0]
                    if mode in modes:
                        colour = artist.get_color() if plot != "histogram" else artist.get_facecolor()
                        colours.setdefault(mode, set()).add(matplotlib.colors.to_hex(colour))
    assert all(len(c) == 1 for c in colours.values()), colours  # one colour per mode, whatever the report
    assert set(colours) == {"sgd", "dyneval", "learned", "cache", "learned+cache"}
    assert len({c.pop() for m, c in colours.items() if m != "learned+cache"}) == 4  # distinct modes, distinct colours
    assert mode_style("learned+cache").color == mode_style("learned").color  # the cache on top: same hue, dashed
    assert mode_style("learned+cache").linestyle == "--" and mode_style("learned").linestyle == "-"
    assert mode_style("my-rule@all") == mode_style("my-rule@all")  # unknown modes: a colour from their name


def test_plots_keep_their_legends_off_the_curves_and_mark_measurements(tmp_path):
    modes = ("dyneval", "learned")
    write_eval_dir(tmp_path, modes=modes)
    write_drift(tmp_path, modes)
    report = render_report(tmp_path, ReportConfig())
    t = load_tokens(tmp_path)
    fig = plot_improvement(report.curve, tmp_path / "i.png")
    assert not fig.axes[0].get_legend() and not fig.axes[1].get_legend()  # the figure's, below the axes
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert labels == ["dyneval", "learned", "articles in bin (right axis)"]  # the grey steps are named
    drift = plot_drift(tmp_path / "drift.csv", tmp_path / "d.png")
    assert all(line.get_marker() not in (None, "None", "") for line in drift.axes[0].get_lines())
    assert not drift.axes[0].get_legend() and drift.legends
    hist = plot_histogram(t, tmp_path / "h.png")
    assert len(hist.axes) == 2  # one panel per mode: no overlapping bars
    assert all(p.get_alpha() in (None, 1.0) for ax in hist.axes for p in ax.patches)  # opaque


def test_heatmap_opens_on_the_most_improved_mode(tmp_path):
    cols = write_eval_dir(tmp_path, modes=("sgd", "learned"))
    cols["nll_sgd"] = cols["nll_static"].copy()  # sgd changed nothing: all white
    cols["nll_learned"] = cols["nll_static"] - 0.5
    pq.write_table(pa.table(cols), tmp_path / "tokens.parquet")
    page = render_report(tmp_path, ReportConfig()).files["heatmap"].read_text()
    assert re.search(r'id="pick-1" hidden checked', page) and not re.search(r'id="pick-0" hidden checked', page)


def test_histogram_bins_have_an_edge_at_zero():
    """No bar straddles 'as good as static' (the x-range always holds 0)."""
    for lo, hi, n in ((-7.2, 18.0, 5), (-70.0, 0.0, 10), (0.0, 0.0, 5), (-1e-3, 2.0, 30)):
        edges = bins_around_zero(lo, hi, n)
        assert edges[0] <= lo and edges[-1] >= hi and len(edges) >= 2 and np.isclose(edges, 0).any()
        assert np.allclose(np.diff(edges), np.diff(edges)[0])  # equal widths


def test_article_titles_are_shown_as_written_not_as_wikitext_tokens():
    from dynlm.report.style import display_title
    assert display_title("M @-@ 82 ( Michigan highway )") == "M-82 (Michigan highway)"
    assert display_title("1 @,@ 000 Guineas") == "1,000 Guineas"
    assert display_title("Frank <unk>") == "Frank <unk>"  # the corpus itself hides the rare word
    assert display_title("<unk> <unk>") == "(title out of vocabulary)"


@pytest.mark.parametrize("modes", [("learned",), ("learned", "dyneval", "cache", "learned+cache")])
def test_the_stream_figures_y_label_fits_its_height(tmp_path, modes):
    """One panel makes a short figure: its y-label wraps instead of running off both edges."""
    write_eval_dir(tmp_path, modes=modes)
    fig = plot_stream(load_tokens(tmp_path), 3, 50, tmp_path / "s.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # constrained layout places the label at draw time
    label = next(t for t in fig.texts if t.get_rotation() == 90 and t.get_text())
    box = label.get_window_extent(canvas.get_renderer())
    assert 0 <= box.y0 and box.y1 <= fig.bbox.height
