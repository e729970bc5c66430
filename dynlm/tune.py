"""`dynlm tune`: grid-search each mode's hyperparameters on validation text the evaluation does not
score, and save the best per mode into the run (RUN/tuned.yaml), which `dynlm evaluate` then loads.

A comparison against an untuned baseline is worthless, so a best value on the edge of its grid
extends that grid one geometric step outwards (up to tune.max_extensions times per mode); a grid
whose best value is still on its edge after that is reported as such, and a grid on which every
point diverges is an error, never a "best".

Segment-length scaling of the per-update rates. Every rule sees the gradient of each segment's
*mean* loss. dyneval divides it by MS, the RMS of training-segment gradients at the same segment
length L, so g / MS is O(1) whatever the loss normalisation; what changes with L is how often an
update happens. lamb and adam_decay are decay fractions per update, so a constant decay per token
needs them ∝ L exactly. For the rates, the per-token drift is ∝ lr / sqrt(L) while segment
gradients are noise-dominated and ∝ lr / L once they are signal-dominated; we keep Krause's L / 5
for all of them (his grid is then reproduced at L = 5) and let the edge extension absorb the rest.
SGD on the mean loss is plain SGD on the summed loss with lr / L, so its grid scales ∝ L exactly.
With rule.grad_stat=batch (the default), MS is Krause's own statistic (the gradient of the mean loss
over a batch of 100 training segments), so his grid applies as it is.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Callable

from .config import Config, ConfigError, to_dict
from .data.sources import load_articles
from .textio import number, open_csv, read_json, write_json
from .device import resolve_device
from .prequential import perplexity
from .model import LSTMLM
from .progress import progress
from .modes import Mode, parse_modes, protocol_of, tuned_keys
from .checkpoint import check_model_matches
from .evaluate import (check_modes, grad_rms_for, model_training_data, params_fingerprint, run_dir_of, score_mode,
                       tokenizer_for)
from .tracking import Tracker
from .tuned import article_range, read_tuned, tune_dir, tuned_path, write_tuned

PER_UPDATE = {"sgd_lr", "dyneval_lr", "dyneval_lamb", "adam_lr", "adam_decay"}  # per update: scaled with the segment length
UPPER_BOUND = {"cache_lambda": 1.0, "adam_decay": 1.0}  # exclusive bounds a grid may not be extended across


def _round(x: float) -> float:
    return float(f"{x:.6g}")  # 3e-5 * 7 -> 0.00021, not 0.00021000000000000001


def initial_grid(cfg: Config, axis: str, mode: str = "") -> list[float]:
    """The grid of `axis` that `mode` starts from (tune.grids.MODE's, else tune.AXIS), at the eval's
    segment length."""
    values = cfg.tune.grids.get(mode, {}).get(axis) or getattr(cfg.tune, axis)  # checked in config/schema.py
    scale = cfg.eval.segment_length / cfg.tune.reference_segment_length if axis in PER_UPDATE else 1.0
    return sorted({_round(v * scale) for v in values})


def extend(grid: list[float], best: float, axis: str) -> float | None:
    """The next geometric step beyond the edge `best` sits on, or None (interior, a fixed single
    value, or a bound in the way)."""
    if len(grid) < 2 or grid[0] < best < grid[-1] or best <= 0:  # 0: the bound of every axis, nothing below
        return None
    new = _round(best * best / grid[1] if best == grid[0] else best * best / grid[-2])
    return new if new < UPPER_BOUND.get(axis, math.inf) else None


def grid_search(grids: dict[str, list[float]], evaluate: Callable[[dict], float], max_extensions: int,
                desc: str = "") -> tuple[dict, dict[tuple, float], dict[str, list[float]]]:
    """Evaluate every point of the product grid, extending axes whose best value is on the edge.
    Returns the best point, every evaluated point's value and the final grids."""
    axes = list(grids)
    grids = {a: list(g) for a, g in grids.items()}
    values: dict[tuple, float] = {}
    for round_ in range(max_extensions + 1):
        todo = [p for p in itertools.product(*grids.values()) if p not in values]
        for point in progress(todo, desc=desc, leave=False):
            v = evaluate(dict(zip(axes, point)))
            values[point] = v if math.isfinite(v) else math.inf  # a diverging setting just loses
        best = min(values, key=values.get)
        if not math.isfinite(values[best]):
            raise TuneError(f"{desc or 'tune'}: every point of the grid diverged (perplexity inf): "
                            + ", ".join(f"{a} in {g}" for a, g in grids.items())
                            + "; give the tune.* grid smaller rates")
        if round_ == max_extensions:
            break
        grown = False
        for axis, b in zip(axes, best):
            new = extend(grids[axis], b, axis)
            if new is not None and new not in grids[axis]:
                grids[axis] = sorted(grids[axis] + [new])
                grown = True
        if not grown:
            break
    return dict(zip(axes, best)), values, grids


class TuneError(ConfigError):
    """A tuning that cannot give a best value (every grid point diverged)."""


def tuning_articles(articles: list, skip: int, n_articles: int, min_tokens: int) -> list:
    """After the first `skip`: `n_articles` articles, or (0) the fewest that hold `min_tokens` tokens
    (min_tokens 0: the rest of the split)."""
    if n_articles < 0 or skip < 0 or min_tokens < 0:
        raise ConfigError(f"tune articles, skip and tokens must be >= 0, got {n_articles}, {skip}, {min_tokens}")
    if skip >= len(articles):
        raise ConfigError(f"cannot skip {skip} of the {len(articles)} articles: none would be left to tune on")
    rest = articles[skip:]
    if n_articles:
        return rest[:n_articles]
    if not min_tokens:
        return rest
    total = 0
    for i, a in enumerate(rest):
        total += len(a)
        if total >= min_tokens:
            return rest[: i + 1]
    return rest


def mode_grids(mode: Mode, cfg: Config) -> dict[str, list[float]]:
    """The axes `dynlm tune` searches for `mode` (a `+cache` mode: tune.combo_axes only)."""
    keys = tuned_keys(mode)
    if mode.cache and mode.adapts:  # combo_axes are cache keys (config/schema.py)
        keys = tuple(cfg.tune.combo_axes)
    own = cfg.tune.grids.get(mode.name, {})
    if set(own) - set(keys):
        raise ConfigError(f"tune.grids.{mode.name}: {', '.join(sorted(set(own) - set(keys)))} is not searched for "
                          f"{mode.name} (its axes: {', '.join(keys)})")
    return {a: initial_grid(cfg, a, mode.name) for a in keys}


def check_mode_grids(cfg: Config) -> None:
    """A ConfigError for a tune.grids entry that no mode would use (a mistyped mode or axis)."""
    for name in cfg.tune.grids:
        try:
            mode = parse_modes([name])[0]
        except ConfigError as e:
            raise ConfigError(f"tune.grids.{name}: {e}") from None
        if mode.name != name:  # grids are looked up by the mode's own name: another spelling would be ignored
            raise ConfigError(f"tune.grids.{name}: write the mode as {mode.name!r}")
        mode_grids(mode, cfg)


def tune_order(modes: list[Mode]) -> list[Mode]:
    """Plain modes first, then the cache, then the `+cache` combinations (they start from both)."""
    return sorted(modes, key=lambda m: (m.cache, m.adapts and m.cache))


def tune_checkpoint(ck: dict, ckpt_path: Path, cfg: Config, modes: list[str], split: str, n_articles: int,
                    skip: int = 0, learner_state: dict | None = None) -> dict:
    """Grid-search each mode in `modes` on validation articles after the first `skip` (`n_articles` of
    them, or 0: as many as tune.tokens needs); write RUN/tuned.yaml. `learned+cache` reads the learner
    from `learner_state` (or from `ck` when it is a meta checkpoint)."""
    check_model_matches(ck, cfg, ckpt_path)
    parsed = tune_order(check_modes(modes, cfg))
    untunable = [m.name for m in parsed if not tuned_keys(m)]
    if untunable:
        raise ConfigError(f"nothing to tune for {', '.join(untunable)} (tunable: sgd, dyneval, adam, cache and "
                          f"any MODE+cache)")
    learner_state = learner_state if learner_state is not None else ck.get("learner")
    if any(m.rule == "learned" for m in parsed) and learner_state is None:
        raise ConfigError(f"{ckpt_path}: learned+cache needs a learner (a checkpoint written by `dynlm metatrain`)")
    check_mode_grids(cfg)
    grids = {m.name: mode_grids(m, cfg) for m in parsed}  # bad grids fail here, early
    run_dir = run_dir_of(ckpt_path)
    device = resolve_device(cfg.run.device)
    tok = tokenizer_for(ckpt_path, ck)
    all_articles = load_articles(cfg.data, split, tok)
    articles = tuning_articles(all_articles, skip, n_articles, cfg.tune.tokens)
    n_tokens = sum(len(a) for a in articles)
    where = article_range(skip, len(articles))
    if cfg.tune.tokens and n_tokens < cfg.tune.tokens:
        print(f"warning: tuning on {n_tokens:,} tokens ({split} {where}), fewer than tune.tokens="
              f"{cfg.tune.tokens:,}: the split has no more", flush=True)
    lm = LSTMLM(cfg.model, tok.vocab_size)
    params = {k: v.to(device) for k, v in ck["params"].items()}
    ms = (grad_rms_for(run_dir, lm, params, cfg, tok, device, model_training_data(ck, cfg))
          if any(m.rule == "dyneval" for m in parsed) else None)
    path = tuned_path(ckpt_path, cfg)
    earlier = read_tuned(path) if path.exists() else {}

    def ppl_with(mode: Mode, values: dict) -> float:
        point_cfg = dataclasses.replace(cfg, rule=dataclasses.replace(cfg.rule, **values))
        scores = score_mode(mode, lm, params, articles, point_cfg, device, tok.eos_id, ms=ms,
                            learner_state=learner_state)
        return perplexity(float(scores.nll.sum()), n_tokens)

    static_ppl = ppl_with(Mode("static"), {})
    print(f"tuning on {split} {where}, {n_tokens:,} tokens, protocol {protocol_of(cfg.eval)} (segment length "
          f"{cfg.eval.segment_length}, {cfg.eval.batch_size} streams, boundary {cfg.eval.boundary}); "
          f"static ppl {static_ppl:.3f}")
    rows = [{"mode": "static", "values": "", "ppl": static_ppl, "best": False}]  # the reference
    best_modes, fixed, extended, on_edge = search_modes(parsed, grids, cfg, earlier, ppl_with, rows)

    header = (f"# written by `dynlm tune` for {Path(ckpt_path).name}: best of the grid per mode on {split} {where}\n"
              f"# ({n_tokens:,} tokens), protocol {protocol_of(cfg.eval)}: eval.segment_length="
              f"{cfg.eval.segment_length}, eval.batch_size={cfg.eval.batch_size}, eval.boundary={cfg.eval.boundary};\n"
              f"# `dynlm evaluate` loads this file, --rule.x=y still wins.\n")
    provenance = {"split": split, "skip_articles": skip, "n_articles": len(articles), "n_tokens": n_tokens,
                  "weights": params_fingerprint(params)[:16]}
    saved = write_tuned(path, best_modes, header, provenance)
    result = {"checkpoint": str(ckpt_path), "split": split, "n_articles": len(articles), "skip_articles": skip,
              "n_tokens": n_tokens, "protocol": protocol_of(cfg.eval),
              "segment_length": cfg.eval.segment_length, "batch_size": cfg.eval.batch_size,
              "boundary": cfg.eval.boundary, "static_ppl": static_ppl,
              "best": best_modes, "fixed": fixed, "extended": extended, "on_edge": on_edge, "grid": rows,
              "tuned_file": str(path)}
    _write_grid(tune_dir(ckpt_path, cfg), *_with_earlier_modes(tune_dir(ckpt_path, cfg) / "tune.json", rows, result))
    print(f"{grid_table(rows, static_ppl)}\n" + "".join(
        f"best {name}: {', '.join(f'rule.{k}={v:g}' for k, v in values.items())}\n" for name, values in best_modes.items())
        + f"  ->  {path}")
    say_warnings(rows, result, cfg.tune.max_extensions)
    with Tracker(cfg.log, tune_dir(ckpt_path, cfg), to_dict(cfg), job_type="tune") as tracker:
        tracker.log_table("tune/grid", ["mode", "values", "ppl", "rel_vs_static", "best"],
                          [[r["mode"], r["values"], r["ppl"], r["ppl"] / static_ppl - 1, r["best"]] for r in rows])
        best_ppl = {f"tune/best_ppl/{m}": min(r["ppl"] for r in rows if r["mode"] == m)
                    for m in ["static", *best_modes]}
        tracker.log(best_ppl, echo=False)
        tracker.summary({**best_ppl, **{f"tune/{m}/rule.{k}": v for m, vals in saved.items() for k, v in vals.items()}})
    return result


def search_modes(parsed: list[Mode], grids: dict, cfg: Config, earlier: dict, ppl_with, rows: list[dict]):
    """grid_search of each mode in turn (a MODE+cache from its parents' values, found earlier or just now);
    appends every evaluated point to `rows`. Returns the best values, the values held fixed, the grid
    extensions and the axes still on an edge, per mode."""
    best_modes: dict[str, dict[str, float]] = {}
    extended, on_edge, fixed = {}, {}, {}
    for mode in parsed:
        start = start_values(mode, cfg, {**earlier, **best_modes}, grids[mode.name])
        best, values, final = grid_search(grids[mode.name], lambda v, m=mode: ppl_with(m, {**start, **v}),
                                          cfg.tune.max_extensions, desc=f"tune {mode.name}")
        best_modes[mode.name] = {**start, **best}
        fixed[mode.name] = start
        extended[mode.name] = {a: [v for v in final[a] if v not in grids[mode.name][a]] for a in final}
        on_edge[mode.name] = [a for a, v in best.items()  # 0 is a bound (no decay, no cache), not a grid edge
                              if len(final[a]) > 1 and v in (final[a][0], final[a][-1]) and v > 0]
        for point, ppl in sorted(values.items()):
            rows.append({"mode": mode.name, "values": ", ".join(f"{a}={v:g}" for a, v in zip(final, point)),
                         "ppl": ppl, "best": point == tuple(best.values())})
    return best_modes, fixed, extended, on_edge


def start_values(mode: Mode, cfg: Config, found: dict[str, dict], grid: dict) -> dict[str, float]:
    """The values a MODE+cache is not tuned over but starts from: the plain mode's and the cache's own
    tuned values (`found`, else the config's, said as a warning); none for any other mode."""
    start: dict[str, float] = {}
    if mode.cache and mode.adapts:
        for part in (mode.base.name, "cache"):
            keys = tuned_keys(parse_modes([part])[0])
            start.update({k: found.get(part, {}).get(k, getattr(cfg.rule, k)) for k in keys})
            if part not in found and keys:
                print(f"warning: {mode.name}: {part} is not tuned; its values come from the config "
                      f"({', '.join(f'{k}={start[k]:g}' for k in keys)})")
    return {k: v for k, v in start.items() if k not in grid}


def say_warnings(rows: list[dict], result: dict, max_extensions: int) -> None:
    """Grids extended, modes no value of which beats the static model, grids still on their edge."""
    static_ppl, extended, on_edge = result["static_ppl"], result["extended"], result["on_edge"]
    if any(v for ext in extended.values() for v in ext.values()):
        print(f"grids extended at the edge: {json.dumps(extended)}")
    worse = [m for m in result["best"] if min(r["ppl"] for r in rows if r["mode"] == m) >= static_ppl]
    if worse:
        print(f"warning: no value tried for {', '.join(worse)} beats the static model on the tuning text "
              f"(static ppl {static_ppl:.3f}); widen the grid towards smaller rates")
    edge = {m: a for m, a in on_edge.items() if a}
    if edge:
        print(f"warning: still on the edge of the grid after {max_extensions} extension(s): "
              + "; ".join(f"{m}: {', '.join(a)}" for m, a in edge.items())
              + " (raise tune.max_extensions or move the grid)")


def _with_earlier_modes(path: Path, rows: list[dict], result: dict) -> tuple[list[dict], dict]:
    """Keep the grids of the modes tuned earlier on the same text (tune.json then covers every mode in
    tuned_PROTOCOL.yaml, whether tuned in one call or one mode at a time)."""
    if not path.exists():
        return rows, result
    try:
        old = read_json(path)
    except (OSError, ValueError):
        return rows, result
    same = all(old.get(k) == result[k] for k in ("checkpoint", "split", "skip_articles", "n_articles", "n_tokens"))
    if not same:
        return rows, result
    now = set(result["best"])
    kept = [{**r, "ppl": number(r["ppl"])} for r in old.get("grid", [])  # null: it diverged (inf)
            if r["mode"] not in now and r["mode"] != "static"]
    merged = dict(result)
    for k in ("best", "fixed", "extended", "on_edge"):
        merged[k] = {**{m: v for m, v in old.get(k, {}).items() if m not in now}, **result[k]}
    rows = rows[:1] + kept + rows[1:]
    merged["grid"] = rows
    return rows, merged


def _write_grid(out: Path, rows: list[dict], result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open_csv(out / "grid.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_json(out / "tune.json", result)  # strict JSON: a diverged grid point's ppl (inf) is null


def grid_table(rows: list[dict], static_ppl: float) -> str:
    lines = ["| mode | values | ppl | vs static | |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['values']} | {r['ppl']:.3f} | {100 * (r['ppl'] / static_ppl - 1):+.2f}% | "
                     f"{'best' if r['best'] else ''} |")
    return "\n".join(lines)
