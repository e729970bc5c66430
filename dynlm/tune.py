"""`dynlm tune`: grid-search the baselines' hyperparameters on a slice of validation articles and
save the best into the run (RUN/tuned.yaml), which `dynlm evaluate` then loads by itself.

A comparison against an untuned baseline is worthless, so a best value on the edge of its grid
extends that grid one geometric step outwards (up to tune.max_extensions times per mode).

Segment-length scaling of the per-update rates. Our gradient is that of each segment's *mean*
loss, and dyneval divides it by MS, the RMS of such gradients at the same segment length L, so
g / MS is O(1) whatever the loss normalisation; what changes with L is how often an update
happens. lamb is a decay fraction per update, so a constant decay per token needs lamb ∝ L
exactly. For lr the per-token drift is ∝ lr / sqrt(L) while segment gradients are noise-dominated
(small L) and ∝ lr / L once they are signal-dominated, so the right scaling lies between sqrt(L)
and L; we keep Krause's L / 5 for both (his grid is then reproduced at L = 5) and let the edge
extension absorb the rest. SGD on the mean loss is plain SGD on the summed loss with lr / L, so
its grid scales ∝ L exactly. One more difference from Krause: his MS averages the gradient over
a batch of 100 segments, ours is per segment (what the update actually sees), i.e. up to 10x
larger on noise-dominated coordinates; the best dyneval lr can therefore sit above his grid,
which the edge extension again covers.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Callable

import yaml
from tqdm.auto import tqdm

from .config import Config, ConfigError, to_dict
from .data.sources import load_articles
from .device import resolve_device
from .evaluate import perplexity
from .model import LSTMLM
from .run_eval import check_modes, grad_rms_for, run_dir_of, score_mode, tokenizer_for
from .tracking import Tracker

TUNED_FILE = "tuned.yaml"
MODE_AXES = {"sgd": ("sgd_lr",), "dyneval": ("dyneval_lr", "dyneval_lamb"), "cache": ("cache_theta", "cache_lambda")}
PER_UPDATE = {"sgd_lr", "dyneval_lr", "dyneval_lamb"}  # rates per update: scaled with the segment length
UPPER_BOUND = {"cache_lambda": 1.0}  # exclusive bounds a grid may not be extended across


def _round(x: float) -> float:
    return float(f"{x:.6g}")  # 3e-5 * 7 -> 0.00021, not 0.00021000000000000001


def initial_grid(cfg: Config, axis: str) -> list[float]:
    values = getattr(cfg.tune, axis)
    if not values or any(not (v > 0) for v in values):
        raise ConfigError(f"tune.{axis} must be a non-empty list of positive values, got {values}")
    scale = cfg.eval.segment_length / cfg.tune.reference_segment_length if axis in PER_UPDATE else 1.0
    return sorted({_round(v * scale) for v in values})


def extend(grid: list[float], best: float, axis: str) -> float | None:
    """The next geometric step beyond the edge `best` sits on, or None (interior, a fixed single
    value, or a bound in the way)."""
    if len(grid) < 2 or grid[0] < best < grid[-1]:
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
        for point in tqdm(todo, desc=desc, leave=False):
            v = evaluate(dict(zip(axes, point)))
            values[point] = v if math.isfinite(v) else math.inf  # a diverging setting just loses
        best = min(values, key=values.get)
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


def tuned_path(ckpt_path: Path) -> Path:
    return run_dir_of(ckpt_path) / TUNED_FILE


def read_tuned(path: Path) -> dict[str, float]:
    """RUN/tuned.yaml as flat {'rule.key': value}; a malformed file is a clear error."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or set(data) != {"rule"} or not isinstance(data["rule"], dict):
        raise ConfigError(f"{path}: expected a mapping with one 'rule' section of tuned values")
    return {f"rule.{k}": v for k, v in data["rule"].items()}


def write_tuned(path: Path, best: dict[str, float], header: str) -> dict[str, float]:
    """Merge `best` (rule keys) into RUN/tuned.yaml, keeping values tuned earlier for other modes."""
    rule = read_tuned(path) if path.exists() else {}
    rule = {k.removeprefix("rule."): v for k, v in rule.items()} | best
    path.write_text(header + yaml.safe_dump({"rule": rule}, sort_keys=True))
    return rule


def article_range(skip: int, n: int) -> str:
    """'articles 21-22' (1-based, as people count them), 'the first 2 articles', or with n = 0 (the rest
    of the split) 'articles after the first 20'."""
    if n == 0:
        return f"articles after the first {skip}" if skip else "articles (all of them)"
    if skip == 0:
        return f"the first {n} article{'s' * (n != 1)}"
    return f"article {skip + 1}" if n == 1 else f"articles {skip + 1}-{skip + n}"


def tune_checkpoint(ck: dict, ckpt_path: Path, cfg: Config, modes: list[str], split: str, n_articles: int,
                    skip: int = 0) -> dict:
    """Grid-search each mode in `modes` on `n_articles` of `split` after its first `skip`; write
    RUN/tuned.yaml."""
    check_modes(modes, cfg, available=tuple(MODE_AXES))
    if n_articles < 0 or skip < 0:
        raise ConfigError(f"tune articles and skip must be >= 0 (articles 0 = the rest of the split), "
                          f"got {n_articles}, {skip}")
    grids = {m: {a: initial_grid(cfg, a) for a in MODE_AXES[m]} for m in modes}  # bad grids fail here, early
    run_dir = run_dir_of(ckpt_path)
    device = resolve_device(cfg.train.device)
    tok = tokenizer_for(ckpt_path, ck)
    articles = load_articles(cfg.data, split, tok)
    if skip >= len(articles):
        raise ConfigError(f"cannot skip {skip} of the {len(articles)} {split} articles: none would be left to tune on")
    articles = articles[skip: skip + n_articles] if n_articles else articles[skip:]
    n_tokens = sum(len(a) for a in articles)
    lm = LSTMLM(cfg.model, tok.vocab_size)
    params = {k: v.to(device) for k, v in ck["params"].items()}
    ms = grad_rms_for(run_dir, lm, params, cfg, tok, device) if "dyneval" in modes else None

    def ppl_with(mode: str, values: dict) -> float:
        point_cfg = dataclasses.replace(cfg, rule=dataclasses.replace(cfg.rule, **values))
        scores = score_mode(mode, lm, params, articles, point_cfg, device, tok.eos_id, ms=ms)
        return perplexity(float(scores.nll.sum()), n_tokens)

    static_ppl = ppl_with("static", {})
    print(f"tuning on {split} {article_range(skip, len(articles))}, {n_tokens:,} tokens, segment length "
          f"{cfg.eval.segment_length}, boundary {cfg.eval.boundary}; static ppl {static_ppl:.3f}")
    rows = [{"mode": "static", "values": "", "ppl": static_ppl, "best": False}]  # the reference
    best_rule, extended = {}, {}
    for mode in modes:
        best, values, final = grid_search(grids[mode], lambda v, m=mode: ppl_with(m, v), cfg.tune.max_extensions,
                                          desc=f"tune {mode}")
        best_rule.update(best)
        extended[mode] = {a: [v for v in final[a] if v not in grids[mode][a]] for a in final}
        for point, ppl in sorted(values.items()):
            rows.append({"mode": mode, "values": ", ".join(f"{a}={v:g}" for a, v in zip(final, point)),
                         "ppl": ppl, "best": point == tuple(best.values())})

    header = (f"# written by `dynlm tune` for {Path(ckpt_path).name}: best of the grid on {split} "
              f"{article_range(skip, len(articles))},\n# eval.segment_length={cfg.eval.segment_length}, "
              f"eval.boundary={cfg.eval.boundary}; `dynlm evaluate` loads this file, --rule.x=y still wins.\n")
    path = run_dir / TUNED_FILE
    saved = write_tuned(path, best_rule, header)
    result = {"checkpoint": str(ckpt_path), "split": split, "n_articles": len(articles), "skip_articles": skip,
              "n_tokens": n_tokens,
              "segment_length": cfg.eval.segment_length, "boundary": cfg.eval.boundary, "static_ppl": static_ppl,
              "best": best_rule, "extended": extended, "grid": rows, "tuned_file": str(path)}
    _write_grid(run_dir / "tune", rows, result)
    print(grid_table(rows, static_ppl))
    print(f"best: {', '.join(f'rule.{k}={v:g}' for k, v in best_rule.items())}  ->  {path}")
    if any(v for ext in extended.values() for v in ext.values()):
        print(f"grids extended at the edge: {json.dumps(extended)}")
    with Tracker(cfg.log, run_dir / "tune", to_dict(cfg), job_type="tune") as tracker:
        tracker.log_table("tune/grid", ["mode", "values", "ppl", "rel_vs_static", "best"],
                          [[r["mode"], r["values"], r["ppl"], r["ppl"] / static_ppl - 1, r["best"]] for r in rows])
        best_ppl = {f"tune/best_ppl/{m}": min(r["ppl"] for r in rows if r["mode"] == m) for m in ["static", *modes]}
        tracker.log(best_ppl, echo=False)
        tracker.summary({**best_ppl, **{f"tune/rule.{k}": v for k, v in saved.items()}})
    return result


def _write_grid(out: Path, rows: list[dict], result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "grid.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "tune.json").write_text(json.dumps(result, indent=2))


def grid_table(rows: list[dict], static_ppl: float) -> str:
    lines = ["| mode | values | ppl | vs static | |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['values']} | {r['ppl']:.3f} | {100 * (r['ppl'] / static_ppl - 1):+.2f}% | "
                     f"{'best' if r['best'] else ''} |")
    return "\n".join(lines)


def tuned_in_effect(path: Path, ckpt_path: Path, cfg: Config) -> dict:
    """Say (and return, for summary.json) which tuned values `evaluate` runs with; explicit
    overrides (--rule.x=y, --config files) win over RUN/tuned.yaml."""
    values = read_tuned(path)
    effective = {k: getattr(cfg.rule, k.removeprefix("rule.")) for k in values}
    overridden = sorted(k for k in values if effective[k] != values[k])
    print(f"using tuned baseline values from {path}: " + ", ".join(f"{k}={v:g}" for k, v in effective.items())
          + (f" (overridden here: {', '.join(overridden)})" if overridden else ""))
    warning = tuned_conditions_warning(ckpt_path, cfg)
    if warning:
        print(warning)
    return {"file": str(path), "values": values, "effective": effective, "overridden": overridden}


def tuned_conditions_warning(ckpt_path: Path, cfg: Config) -> str | None:
    """A warning when evaluate runs at another segment length / boundary than the values were tuned at."""
    info = run_dir_of(ckpt_path) / "tune" / "tune.json"
    if not info.exists():
        return None
    tuned = json.loads(info.read_text())
    now = {"segment_length": cfg.eval.segment_length, "boundary": cfg.eval.boundary}
    diff = {k: (tuned.get(k), v) for k, v in now.items() if tuned.get(k) != v}
    if not diff:
        return None
    return ("warning: the tuned values were tuned at " + ", ".join(f"eval.{k}={a}" for k, (a, _) in diff.items())
            + " but this evaluation uses " + ", ".join(f"eval.{k}={b}" for k, (_, b) in diff.items())
            + "; re-run `dynlm tune` with the same settings")
