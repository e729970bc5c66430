"""experiments/RESULTS.md and README's generated block, rendered from the experiment records under
RUNS/experiments."""
from __future__ import annotations

import re
from pathlib import Path


from ..textio import number, read_text
from ..modes import PROTOCOLS
from ..tuned import article_range
from .registry import CORPUS, EXPERIMENTS, SCALES, SPLIT
from .configs import RECORD, _read_json

# ---- RESULTS.md and README ------------------------------------------------------------------------
PUBLISHED_WT2 = (  # published WikiText-2 perplexities of much larger models: references, not our results
    ("AWD-LSTM, static (Merity et al., 2018)", "68.6", "65.8"),
    ("AWD-LSTM + dynamic evaluation (Krause et al., 2018)", "46.4", "44.3"),
    ("AWD-LSTM + neural cache (Merity et al., 2018)", "", "52.0"),
    ("meta-learned dynamical LM, ACL 2018 version (Wolf, Chaumond & Delangue, \"Continuous Learning in a "
     "Hierarchical Multiscale Neural Network\")", "", "46.9"),
)
MODE_ORDER = ("static", "sgd", "dyneval", "dyneval@lstm", "adam", "adam@all", "cache", "learned",
              "learned@all")  # the overview's columns
COMPARISON_ORDER = ("static", "sgd", "dyneval", "dyneval@lstm", "adam", "adam@all", "learned", "learned@all", "cache",
                    "sgd+cache", "dyneval+cache", "adam+cache", "learned+cache", "learned@all+cache")
# the comparison table's columns: per protocol, the experiments scoring one base model on the same articles
PROTOCOL_EXPERIMENTS = (("article", ("2-level", "2-level-all")), ("krause", ("krause",)))
README_BEGIN = "<!-- BEGIN generated: dynlm experiment --results (CPU WikiText-2 table); do not edit by hand -->"
README_END = "<!-- END generated: dynlm experiment --results -->"


def _ppl(m: dict) -> float:
    """Per-word perplexity where the tokens are not words (sentencepiece), so all rows compare."""
    return number(m.get("word_ppl", m["ppl"]))  # null in summary.json: diverged (inf)


def collect_results(runs: Path) -> list[dict]:
    """Every experiment record under RUNS/experiments with its arms' summaries, in registry order."""
    found = []
    for path in sorted(Path(runs, "experiments").glob("*/*/experiment.json")):
        record = _read_json(path)
        if not record:
            continue
        for arm in record["arms"]:
            eval_dir = path.parent / arm["name"] / f"eval_{SPLIT}"
            arm["summary"] = _read_json(eval_dir / "summary.json")
            arm["record"] = _read_json(eval_dir / RECORD) or {}
        found.append(record)
    order = {n: i for i, n in enumerate(EXPERIMENTS)}
    return sorted(found, key=lambda r: (SCALES.index(r["scale"]) if r["scale"] in SCALES else 9,
                                        order.get(r["experiment"], 99), r["experiment"]))


def _cell(modes: dict, mode: str) -> str:
    if mode not in modes:
        return ""
    m = modes[mode]
    # the change of the perplexity shown (per word for sentencepiece), not of the per-token one
    rel = _ppl(m) / _ppl(modes["static"]) - 1 if "static" in modes and mode != "static" else None
    return f"{_ppl(m):.2f}" + (f" ({100 * rel:+.1f}%)" if rel is not None else "")


def overview_table(records: list[dict], scale: str) -> str:
    lines = ["| experiment | arm | articles | " + " | ".join(MODE_ORDER) + " |",
             "|---|---|---|" + "---|" * len(MODE_ORDER)]
    for r in records:
        if r["scale"] != scale:
            continue
        for arm in r["arms"]:
            s = (arm.get("summary") or {}).get("modes")
            if not s:
                continue
            first = next(iter(s.values()))
            word = " (per word)" if "word_ppl" in first else ""
            lines.append(f"| {r['experiment']}{word} | {arm['name']} | {first['n_articles']} | "
                         + " | ".join(_cell(s, m) for m in MODE_ORDER) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _summary(records: list[dict], scale: str, experiment: str) -> dict | None:
    r = next((r for r in records if r["scale"] == scale and r["experiment"] == experiment), None)
    return ((r or {}).get("arms") or [{}])[0].get("summary")


def protocol_summary(records: list[dict], scale: str, experiments: tuple[str, ...]) -> dict | None:
    """The first experiment's summary, with the modes of the others added where they scored the same
    articles with the same static model (the same static perplexity and article count): one column."""
    found = [s for s in (_summary(records, scale, e) for e in experiments) if s and s.get("modes")]
    if not found:
        return None
    first, modes, settings = found[0], dict(found[0]["modes"]), dict(found[0].get("settings") or {})

    def same_text(s: dict) -> bool:
        a, b = first["modes"].get("static"), s["modes"].get("static")
        return bool(a and b) and a["n_articles"] == b["n_articles"] and a["n_tokens"] == b["n_tokens"] \
            and abs(_ppl(a) - _ppl(b)) < 1e-6 * _ppl(a)
    for s in found[1:]:
        if same_text(s):
            modes.update({m: v for m, v in s["modes"].items() if m not in modes})
            settings.update({m: v for m, v in (s.get("settings") or {}).items() if m not in settings})
    return {**first, "modes": modes, "settings": settings}


def comparison_table(records: list[dict], scale: str) -> str:
    """Every mode (rows) under each evaluation protocol (columns) on the same base model and articles."""
    cols = [(p, protocol_summary(records, scale, e)) for p, e in PROTOCOL_EXPERIMENTS]
    cols = [(p, s) for p, s in cols if s and s.get("modes")]
    if not cols:
        return ""
    modes = [m for m in COMPARISON_ORDER if any(m in s["modes"] for _, s in cols)]
    modes += sorted({m for _, s in cols for m in s["modes"]} - set(modes))
    head = " | ".join(f"`{s.get('protocol', p)}` protocol ({next(iter(s['modes'].values()))['n_articles']} articles)"
                      for p, s in cols)
    lines = [f"| mode | {head} |", "|---|" + "---|" * len(cols)]
    for m in modes:
        cells = [_cell(s["modes"], m) or ("not run" if m.startswith("learned") and p == "krause" else "")
                 for p, s in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _record(records: list[dict], scale: str, experiment: str) -> dict | None:
    return next((r for r in records if r["scale"] == scale and r["experiment"] == experiment), None)


def tuning_clause(s: dict, r: dict | None = None) -> str:
    """How the compared modes got their values, as the summary (and the tuning records) say it."""
    settings = s.get("settings") or {}
    untuned = sorted(m for m, vals in settings.items() if any(v["source"] != "tuned" for v in vals.values()))
    overlap = (s.get("tuned") or {}).get("overlap")
    if overlap:
        return f"tuned on text that is scored too: {overlap}"
    tuned = [m for m, vals in settings.items() if vals and m not in untuned]
    text = "every tuned mode tuned on other validation articles" if tuned else "no mode tuned"
    edge = tune_edges(r, s.get("protocol")) if r else {}
    if edge:
        text += f"; still on a grid edge: {', '.join(f'{m} ({a})' for m, axes in edge.items() for a in axes)}"
    return text + (f"; not tuned (config or explicit values): {', '.join(untuned)}" if untuned else "")


def comparisons(m: dict[str, dict]) -> list[str]:
    """Each learned rule against the baselines on the same weights (LSTM: dyneval@lstm and the adam
    control; all: dyneval and adam@all; with the cache: dyneval+cache), and the LSTM-only rule against
    Krause's dyneval of every weight, for the modes `m` holds."""
    def cmp(a: str, b: str) -> str:
        gap = _ppl(m[b]) - _ppl(m[a])
        return (f"{a} {_ppl(m[a]):.2f} vs {b} {_ppl(m[b]):.2f}: {a} "
                + (f"wins by {gap:.2f} ppl" if gap > 0 else f"loses by {-gap:.2f} ppl"))
    pairs = [("learned", "dyneval@lstm"), ("learned", "dyneval"), ("learned", "adam"), ("learned@all", "dyneval"),
             ("learned@all", "adam@all"), ("learned+cache", "dyneval+cache"), ("learned@all+cache", "dyneval+cache")]
    return [cmp(a, b) for a, b in pairs if a in m and b in m]


def goal_note(records: list[dict], scale: str) -> str:
    """The headline: where the learned rule stands against tuned dynamic evaluation under the same
    protocol, on the same weights (dyneval@lstm), on all weights (Krause's dyneval) and against the
    hand-set member of its own family (adam), and which mode is best of those run; said as the numbers
    say it, also when the learned rule loses."""
    r = _record(records, scale, "2-level")
    s = protocol_summary(records, scale, dict(PROTOCOL_EXPERIMENTS)["article"])
    if not s or not {"learned", "static"} <= set(s["modes"]):
        return ""
    m = s["modes"]
    best = min(m, key=lambda k: _ppl(m[k]))
    left_out = [mode for e in dict(PROTOCOL_EXPERIMENTS)["article"]
                for mode in (_record(records, scale, e) or {}).get("modes_left_out") or []]
    text = (f"**Headline** (`{s.get('protocol', '?')}` protocol, one base model, the first "
            f"{m['static']['n_articles']} validation articles; {tuning_clause(s, r)}): "
            + "; ".join(comparisons(m))
            + f". Best of the modes run: {best} ({_ppl(m[best]):.2f}, {100 * m[best]['rel_change_vs_static']:+.1f}% "
            f"vs static)" + (f"; not run here: {', '.join(left_out)}" if left_out else "") + ".")
    k = _summary(records, scale, "krause")
    if k and {"dyneval", "static"} <= set(k["modes"]):
        km = k["modes"]
        kbest = min(km, key=lambda x: _ppl(km[x]))
        said = comparisons(km)
        text += (f" Under the `{k.get('protocol', '?')}` protocol (`dynlm experiment krause`; "
                 f"{tuning_clause(k, _record(records, scale, 'krause'))}"
                 + ("; the learner meta-trained for it): " if said else "): ")
                 + "; ".join(said or ["no learned rule has been meta-trained for that protocol yet"]) + f". Best of the modes run there: {kbest} ({_ppl(km[kbest]):.2f}, "
                 f"{100 * km[kbest]['rel_change_vs_static']:+.1f}% vs static).")
    return text


def published_table() -> str:
    lines = ["| published model (WikiText-2, much larger than ours) | valid ppl | test ppl |", "|---|---|---|"]
    lines += [f"| {name} | {v or '—'} | {t or '—'} |" for name, v, t in PUBLISHED_WT2]
    return "\n".join(lines)


def tuning_articles(r: dict) -> str:
    """Which validation text the baselines were tuned on, and whether the evaluation scores it too."""
    scored = [m["n_articles"] for arm in r["arms"] for m in ((arm.get("summary") or {}).get("modes") or {}).values()]
    on = next(((arm.get("summary") or {}).get("tuned", {}).get("tuned_on") for arm in r["arms"]
               if (arm.get("summary") or {}).get("tuned", {}).get("tuned_on")), None)
    if on:
        skip, n = on.get("skip_articles", 0), on.get("n_articles", 0)
        where = f"{on.get('split', 'valid')} {article_range(skip, n)} ({on.get('n_tokens', 0):,} tokens)"
    else:
        skip, n = r.get("tune_skip_articles", 0), r.get("tune_articles", 0)
        where = f"validation {article_range(skip, n)}"
    if not scored:
        return f"tuned on {where}"
    apart = skip >= max(scored)  # the evaluation scores the first articles of the split
    return f"tuned on {where}, " + ("apart from the evaluated ones" if apart else "which are among the evaluated ones")


def tune_edges(r: dict, protocol: str | None) -> dict[str, list[str]]:
    """{mode: axes} of the experiment's tuned modes whose best value sat on the edge of its grid after the
    allowed extensions, from the tuning records beside the base model."""
    if not r.get("tuned") or not protocol or protocol not in PROTOCOLS:
        return {}
    records = _read_json(Path(r["base"]["run_dir"]) / f"tune_{protocol}" / RECORD) or {}
    return {m: records[m]["on_edge"] for m in r["tuned"] if records.get(m, {}).get("on_edge")}


def kept_clause(rec: dict) -> str:
    """'; MODES kept from the evaluation at commit C on T by `CMD`' for the modes an evaluation record
    kept from earlier runs (its `scored_by`), grouped by the run that scored them."""
    groups: dict[tuple, list[str]] = {}
    for m, by in (rec.get("scored_by") or {}).items():
        run = (by.get("commit"), by.get("finished"), by.get("command"))
        if run != (rec.get("commit"), rec.get("finished"), rec.get("command")):
            groups.setdefault(run, []).append(m)
    return "".join(f"; {', '.join(ms)} kept from the evaluation at commit `{c or '?'}` on {t or '?'} by `{cmd or '?'}`"
                   for (c, t, cmd), ms in groups.items())


def experiment_section(r: dict) -> str:
    lines = [f"### {r['experiment']}: {r['title']}", ""]
    tune = f" Tuned modes ({', '.join(r['tuned'])}) {tuning_articles(r)}." if r.get("tuned") else ""
    protocol = next(((arm.get("summary") or {}).get("protocol") for arm in r["arms"]
                     if (arm.get("summary") or {}).get("protocol")), None)
    tune = (f" Protocol: `{protocol}`." if protocol else "") + tune
    edge = tune_edges(r, protocol)
    if edge:
        tune += (" Still on the edge of its grid after the allowed extensions (so possibly under-tuned): "
                 + "; ".join(f"{m} ({', '.join(a)})" for m, a in edge.items()) + ".")
    lines.append(f"Data: {r.get('data', '?')}. Base model: `{r['base']['run_dir']}` ({', '.join(r['base']['files'])}"
                 + (f"; {r['base']['progress']}" if r['base'].get("progress") else "") + ")." + tune)
    lines += ["", "| arm | mode | valid ppl | per-word ppl | vs static (per token) | first 100 tokens of each article "
                  "(ppl) | tokens/s | tokens | articles |", "|---|---|---|---|---|---|---|---|---|"]
    produced = []
    for arm in r["arms"]:
        s = (arm.get("summary") or {}).get("modes")
        if not s:
            lines.append(f"| {arm['name']} | (not evaluated yet) | | | | | | | |")
            continue
        for mode in [m for m in COMPARISON_ORDER if m in s] + [m for m in s if m not in COMPARISON_ORDER]:
            m = s[mode]
            rel, tps, word = m.get("rel_change_vs_static"), m.get("tokens_per_s"), m.get("word_ppl")
            early = m.get("ppl_first100")
            cells = [arm["name"], mode, f"{number(m['ppl']):.2f}", "" if word is None else f"{word:.2f}",
                     "" if rel is None else f"{100 * rel:+.2f}%", "" if early is None else f"{early:.2f}",
                     "" if tps is None else f"{tps:,.0f}",
                     f"{m['n_tokens']:,}", str(m["n_articles"])]
            lines.append("| " + " | ".join(cells) + " |")
        rec = arm.get("record", {})
        settings = (arm.get("summary") or {}).get("settings") or {}
        values = [f"{mode} " + ", ".join(f"{k}={v['value']:g}" + ("" if v["source"] == "tuned" else f" ({v['source']})")
                                        for k, v in vals.items()) for mode, vals in settings.items() if vals]
        tuned = f"; values (tuned unless marked): {'; '.join(values)}" if values else ""
        subset = (f"first {arm['eval_max_articles']} validation articles (eval.max_articles)"
                  if arm.get("eval_max_articles") else "all validation articles")
        if arm.get("eval_boundary") == "continuous":  # how many boundaries a stream crosses depends on it
            streams = min(arm["eval_streams"], max(m["n_articles"] for m in s.values()))
            subset += f", read continuously as {streams} stream{'s' * (streams != 1)}"
        meta = f"; meta-training {arm['meta_progress']} (`{arm['meta_run']}`)" if arm.get("meta_progress") else ""
        produced.append(f"- {arm['name']}: {subset}{meta}{tuned}; evaluated at commit `{rec.get('commit', '?')}`"
                        f" on {rec.get('finished', '?')} by `{rec.get('command', r['command'])}`"
                        + kept_clause(rec))
    lines += ["", *produced]
    if r.get("modes_left_out"):
        lines += ["", f"Not run in this record (`--modes`): {', '.join(r['modes_left_out'])}."]
    return "\n".join(lines)


def render_results(records: list[dict]) -> str:
    out = ["# Experiment results", "",
           "Generated by `dynlm experiment` (or `dynlm experiment --results`) from the run directories under "
           "`runs/experiments/`; do not edit by hand. Perplexities are on the validation split; `vs static` is the "
           "relative perplexity change against the static model on the same articles; tokens/s is the evaluation "
           "throughput of each mode on the machine that ran it (shared CPUs at CPU scale). Sentencepiece runs are "
           "compared by per-word perplexity (the overview shows it; the tables show both).", ""]
    for scale in SCALES:
        recs = [r for r in records if r["scale"] == scale]
        out += [f"## {scale.upper() if scale == 'cpu' else 'Paper'} scale ({CORPUS[scale]})", ""]
        table = overview_table(records, scale)
        out += [table, ""] if table else ["No experiment at this scale has been run yet.", ""]
        comparison = comparison_table(records, scale)
        if comparison:
            out += ["### Every mode under both evaluation protocols", "", comparison, ""]
        note = goal_note(records, scale)
        if note:
            out += [note, ""]
        for r in recs:
            out += [experiment_section(r), ""]
        missing = [n for n in EXPERIMENTS if n not in {r["experiment"] for r in recs}]
        if missing:
            out += ["Not run yet: " + ", ".join(f"`dynlm experiment {n} --scale {scale}`" for n in missing), ""]
    out += ["## Published reference numbers", "", published_table(), ""]
    return "\n".join(out)


MODE_LEGEND = ("Modes: `static` no adaptation; `sgd` plain gradient steps; `dyneval` Krause et al.'s dynamic "
               "evaluation (every weight unless `@lstm`); `adam` the hand-set Adam-like control of the learned rule's "
               "form; `learned` the meta-learned rule (LSTM weights unless `@all`); `cache` Grave et al.'s neural cache, "
               "`MODE+cache` on top of MODE. Protocols: `article` reads each article from θ0, segments of "
               f"{PROTOCOLS['article']['segment_length']} tokens; `krause` one stream through all articles, never "
               f"reset, segments of {PROTOCOLS['krause']['segment_length']}. A blank cell: not run by "
               "`dynlm experiment` under that protocol.")


def comparison_commands(records: list[dict], scale: str) -> list[str]:
    """The commands whose records fill the comparison table, one per experiment, in column order."""
    found = [_record(records, scale, e) for _, exps in PROTOCOL_EXPERIMENTS for e in exps]
    return [r["command"] for r in found if r and r.get("command")]


def readme_section(records: list[dict]) -> str:
    table = overview_table(records, "cpu") or "_No CPU experiment has been run yet._"
    comparison = comparison_table(records, "cpu")
    lead = []
    if comparison:
        commands = "\n".join(comparison_commands(records, "cpu"))
        first = next(s for s in (protocol_summary(records, "cpu", e) for _, e in PROTOCOL_EXPERIMENTS) if s)
        articles = next(iter(first["modes"].values()))["n_articles"]  # the table's columns score the same articles
        lead = [f"Every mode on the first {articles} WikiText-2 validation articles, one CPU-scale base model, under both "
                "evaluation protocols (perplexity; change vs static in brackets; every tuned mode tuned on other "
                "validation articles):", "", comparison, "", MODE_LEGEND, "",
                "Produced by (WikiText-2 read from `../shared/data/wikitext-2`, or `--data-dir DIR`; `make demo` runs "
                "the same pipeline on the bundled synthetic corpus):", "", f"```bash\n{commands}\n```", "",
                goal_note(records, "cpu"), ""]
    return "\n".join([README_BEGIN, "", *lead, "Every experiment run so far (details, commits and commands in "
                      "[experiments/RESULTS.md](experiments/RESULTS.md)):", "", table, "",
                      "For orientation only, published numbers of a much larger model (AWD-LSTM: 3 layers of "
                      "1150 units, 33M parameters, long GPU training), not produced by this code:", "",
                      published_table(), "", README_END])


def compare_summaries(before: dict, after: dict, threads: tuple[int | None, int] | None = None) -> str:
    """Whether a redone evaluation reproduced the recorded perplexities; if not, by how much, and whether
    the torch thread count changed (it changes the order of floating-point sums, so the last bits)."""
    old = {m: number(v["ppl"]) for m, v in before.get("modes", {}).items()}  # null: diverged (inf)
    new = {m: number(v["ppl"]) for m, v in after.get("modes", {}).items()}
    if old == new:
        return f"reproduced the previous perplexities exactly: {', '.join(f'{m} {p:.4f}' for m, p in new.items())}"

    def change(m):
        a, b = old.get(m, float("nan")), new.get(m, float("nan"))
        moved = m in old and m in new and a != b
        return f"{m} {a:.4f} -> {b:.4f}" + (f" (relative {b / a - 1:+.1e})" if moved else "")
    note = ""
    if threads and threads[0] is not None and threads[0] != threads[1]:
        note = f"; recorded with {threads[0]} torch thread(s), redone with {threads[1]}: set OMP_NUM_THREADS to match"
    return "differs from the previous evaluation: " + ", ".join(change(m) for m in sorted(set(old) | set(new))) + note


def write_results(runs: Path, results_file: Path | None, readme: Path | None) -> None:
    """Regenerate RESULTS.md and the README section (between its markers) from the run directories."""
    records = collect_results(runs)
    if results_file:
        Path(results_file).parent.mkdir(parents=True, exist_ok=True)
        Path(results_file).write_text(render_results(records), encoding="utf-8")
        print(f"results: {results_file} ({len(records)} experiment record(s) under {Path(runs, 'experiments')})")
    if readme and Path(readme).is_file():
        text = read_text(readme)
        pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
        if pattern.search(text):
            Path(readme).write_text(pattern.sub(lambda _: readme_section(records), text, count=1), encoding="utf-8")
            print(f"results: updated the generated table in {readme}")
