"""RUN/tuned_PROTOCOL.yaml: where `dynlm tune` keeps the best values per mode (and where each was
tuned), read back by `evaluate`, the demo and the experiment runner; rule.* keys set explicitly win
over the file."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from .checkpoint import load_checkpoint
from .config import Config, ConfigError, load_yaml
from .evaluate import params_fingerprint, run_dir_of
from .modes import CACHE_KEYS, RULE_KEYS, parse_modes, protocol_slug, tuned_keys
from .textio import read_json

TUNABLE = {k for keys in RULE_KEYS.values() for k in keys} | set(CACHE_KEYS)  # rule.* keys tuned.yaml may hold


def tuned_path(ckpt_path: Path, cfg: Config) -> Path:
    """RUN/tuned_PROTOCOL.yaml: tuned values hold for one way of reading (segment length, streams,
    boundary), so each protocol has its own file (and RUN/tune_PROTOCOL/ its grids)."""
    return run_dir_of(ckpt_path) / f"tuned_{protocol_slug(cfg.eval)}.yaml"


def tune_dir(ckpt_path: Path, cfg: Config) -> Path:
    return run_dir_of(ckpt_path) / f"tune_{protocol_slug(cfg.eval)}"


LEGACY_MODE = {"sgd_lr": "sgd", "dyneval_lr": "dyneval", "dyneval_lamb": "dyneval",
               "cache_theta": "cache", "cache_lambda": "cache"}


def read_tuned(path: Path) -> dict[str, dict[str, float]]:
    """RUN/tuned.yaml as {mode name: {rule key: value}}; a malformed file is a clear error. A file of
    the earlier flat format (one `rule:` section) is read as the values of sgd, dyneval and cache."""
    data = load_yaml(path)[0] or {}  # UTF-8, 1e-3 a number, a repeated key an error naming its line
    if isinstance(data, dict) and set(data) == {"rule"} and isinstance(data["rule"], dict):
        modes: dict[str, dict[str, float]] = {}
        for k, v in data["rule"].items():
            if k in LEGACY_MODE:
                modes.setdefault(LEGACY_MODE[k], {})[k] = v
        return modes
    if (not isinstance(data, dict) or "modes" not in data or set(data) - {"modes", "provenance"}
            or not isinstance(data["modes"], dict) or not all(isinstance(v, dict) for v in data["modes"].values())):
        raise ConfigError(f"{path}: expected a mapping with a 'modes' section of tuned values per mode "
                          f"(and 'provenance': where each was tuned)")
    for name, values in data["modes"].items():
        mode = parse_modes([name])[0]
        bad = sorted(set(values) - set(tuned_keys(mode)))
        if bad:
            raise ConfigError(f"{path}: mode {name}: {bad} are not tuned values of {name} "
                              f"(expected {list(tuned_keys(mode))})")
    return data["modes"]


def read_provenance(path: Path) -> dict[str, dict]:
    """Where each mode of RUN/tuned_PROTOCOL.yaml was tuned: {mode: {split, skip_articles, n_articles,
    n_tokens, weights}} (empty for files written before it was recorded)."""
    try:
        data = load_yaml(path)[0] or {}
    except ConfigError:
        return {}
    prov = data.get("provenance") if isinstance(data, dict) else None
    return prov if isinstance(prov, dict) else {}


def write_tuned(path: Path, best: dict[str, dict[str, float]], header: str,
                provenance: dict | None = None) -> dict[str, dict[str, float]]:
    """Merge `best` ({mode: {key: value}}) into RUN/tuned_PROTOCOL.yaml, keeping modes tuned earlier, each
    with where it was tuned (`provenance`: the text and the weights)."""
    modes = (read_tuned(path) if path.exists() else {}) | best
    prov = (read_provenance(path) if path.exists() else {}) | {m: provenance for m in best if provenance}
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump({"modes": modes, "provenance": prov}, sort_keys=True, allow_unicode=True),
                   encoding="utf-8")
    tmp.replace(path)  # never a half-written file
    return modes


def article_range(skip: int, n: int) -> str:
    """'articles 21-22' (1-based, as people count them), 'the first 2 articles', or with n = 0 (the rest
    of the split) 'articles after the first 20'."""
    if n == 0:
        return f"articles after the first {skip}" if skip else "articles (all of them)"
    if skip == 0:
        return f"the first {n} article{'s' * (n != 1)}"
    return f"article {skip + 1}" if n == 1 else f"articles {skip + 1}-{skip + n}"


def explicit_rule_keys(files, overrides) -> set[str]:
    """rule.* keys set in config files or `section.key=value` overrides: they win over RUN/tuned_PROTOCOL.yaml.
    An unreadable file adds nothing here (load_config reports it)."""
    keys = {o.lstrip("-").split("=", 1)[0].removeprefix("rule.") for o in overrides
            if o.lstrip("-").startswith("rule.")}
    for path in files:
        try:
            data = load_yaml(path)[0] or {}
        except ConfigError:
            continue
        if isinstance(data, dict) and isinstance(data.get("rule"), dict):
            keys |= set(data["rule"])
    return keys


def tuned_in_effect(path: Path, ckpt_path: Path, cfg: Config, explicit=(), scored: tuple[int, int] | None = None) -> dict:
    """What `evaluate` needs of RUN/tuned.yaml (see evaluate.mode_settings): the tuned values per mode,
    the rule keys set explicitly (--rule.x=y, --config files), which win over the file, and where the
    values were tuned. scored (first, count) of the articles the evaluation scores: tuned on any of
    them is said as a warning (`overlap`)."""
    modes = read_tuned(path)
    explicit = {k for k in explicit if k in TUNABLE}
    print(f"using tuned values from {path} for " + ", ".join(modes)
          + (f" (explicitly set here: {', '.join(sorted(explicit))})" if explicit else ""))
    warning = tuned_conditions_warning(ckpt_path, cfg)
    if warning:
        print(warning)
    info = {"file": str(path), "modes": modes, "explicit": sorted(explicit)}
    prov = read_provenance(path)
    if not prov:  # written before provenance was recorded per mode: the last tuning's text stands for all
        tune_info = tune_dir(ckpt_path, cfg) / "tune.json"
        if tune_info.exists():
            t = read_json(tune_info)
            prov = {m: t for m in modes}
    on = {m: {k: p.get(k) for k in ("split", "skip_articles", "n_articles", "n_tokens")} for m, p in prov.items()}
    if on:
        info["tuned_on"] = next(iter(on.values())) if len({json.dumps(v, sort_keys=True) for v in on.values()}) == 1 \
            else on
    overlaps = []
    for m, p in prov.items():
        if scored is not None and p.get("split") == "valid":
            first, count = scored
            lo, hi = p.get("skip_articles", 0), p.get("skip_articles", 0) + p.get("n_articles", 0)
            if lo < first + count and first < hi:
                overlaps.append(f"{m} ({article_range(lo, hi - lo)} of the validation split)")
    if overlaps:
        info["overlap"] = ", ".join(overlaps)
    weights = params_fingerprint(load_checkpoint(ckpt_path)["params"])[:16] if prov else None
    other = sorted(m for m, p in prov.items() if p.get("weights") and p["weights"] != weights)
    if other:
        print(f"warning: {', '.join(other)} were tuned on other weights than {ckpt_path}'s; re-run `dynlm tune`",
              file=sys.stderr)
        info["tuned_on_other_weights"] = other
    return info


def tuned_conditions_warning(ckpt_path: Path, cfg: Config) -> str | None:
    """A warning when evaluate runs at another segment length / boundary than the values were tuned at."""
    info = tune_dir(ckpt_path, cfg) / "tune.json"
    if not info.exists():
        return None
    tuned = read_json(info)
    now = {"segment_length": cfg.eval.segment_length, "boundary": cfg.eval.boundary, "batch_size": cfg.eval.batch_size}
    diff = {k: (tuned.get(k), v) for k, v in now.items() if tuned.get(k) != v}
    if not diff:
        return None
    return ("warning: the tuned values were tuned at " + ", ".join(f"eval.{k}={a}" for k, (a, _) in diff.items())
            + " but this evaluation uses " + ", ".join(f"eval.{k}={b}" for k, (_, b) in diff.items())
            + "; re-run `dynlm tune` with the same settings")
