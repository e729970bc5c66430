"""The arms' configs of an experiment and what identifies a stage's result (the keys under which
static runs, meta-training runs, tunings and evaluations are reused)."""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


from ..checkpoint import flatten_config, load_checkpoint
from ..config import Config, ConfigError, load_config, step_limit, to_dict
from ..evaluate import check_modes, params_fingerprint
from ..textio import dumps, read_json
from ..train.meta import check_meta_config
from ..train.static import check_train_config
from .registry import experiment_file, BASES, EXPERIMENTS, META_FILES, SCALES, Arm, Experiment, at_scale

RECORD = "runner.json"  # what the runner wrote next to a stage's outputs: its key, commit, command

# ---- configs --------------------------------------------------------------------------------------
STATIC_SECTIONS = ("model", "data", "train", "run", "log")  # the command-line overrides the base model sees


@dataclass
class ArmConfig:
    arm: Arm
    files: list[Path]
    cfg: Config


@dataclass
class ExperimentConfigs:
    static_files: list[Path]
    static: Config  # the base model's run: only its own files + model/data/train/log overrides
    arms: list[ArmConfig]


def _section(override: str) -> str:
    return override.lstrip("-").split(".", 1)[0]


def experiment_configs(exp: Experiment, scale: str, overrides: list[str] = ()) -> ExperimentConfigs:
    """Typed, validated configs of the base model and of every arm; a ConfigError names the problem."""
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    overrides = [o.lstrip("-") for o in overrides]
    static_files = [experiment_file(f) for f in BASES[exp.base][scale]]
    # eval/rule/meta/... overrides must not make a new base model: it is shared across experiments
    static = load_config(static_files, [o for o in overrides if _section(o) in STATIC_SECTIONS])
    check_train_config(static)
    arms = []
    for arm in exp.arms:
        # the registry's experiment decides its files: a run of some of its modes reads as the whole would
        full = EXPERIMENTS.get(exp.name, exp)
        names = [*BASES[exp.base][scale], *(META_FILES[scale] if full.learner else ()),
                 *at_scale(exp.files, scale), *at_scale(arm.files, scale)]
        files = [experiment_file(n) for n in names]
        cfg = load_config(files, overrides)
        changed = _mismatches(static_key(to_dict(static)), static_key(to_dict(cfg)))
        if changed:
            raise ConfigError(f"experiment {exp.name!r}, arm {arm.name!r}: its files change the base model "
                              f"({'; '.join(changed)}); model/data/train settings belong in the base files "
                              f"{[f.name for f in static_files]}")
        check_modes(list(exp.modes), cfg)
        if full.learner:
            check_meta_config(cfg)
        arms.append(ArmConfig(arm, files, cfg))
    return ExperimentConfigs(static_files, static, arms)


# ---- what identifies a stage's result -------------------------------------------------------------
def _select(cfg_dict: dict, keys, ignore=()) -> dict:
    """Flattened settings under `keys` (dotted names or whole sections), minus `ignore`; data.path is
    made absolute, so a corpus named relatively and by --data-dir is one corpus."""
    d = copy.deepcopy(cfg_dict)
    data = d.get("data", {})
    if data.get("path"):
        data["path"] = str(Path(data["path"]).resolve())
    return {k: v for k, v in sorted(flatten_config(d).items())
            if any(k == key or k.startswith(key + ".") for key in keys) and k not in ignore}


# settings that change nothing a static run computes (logging, where the token cache lives, device)
STATIC_IGNORE = ("data.cache_dir", "train.log_every", "train.keep_checkpoints", "train.max_bad_steps")
META_IGNORE = ("data.cache_dir", "meta.log_every", "meta.checkpoint_every", "meta.keep_checkpoints",
               "meta.max_bad_steps")
LEARNER_RULE = ("rule.learner", "rule.learner_hidden", "rule.learner_features", "rule.forget_bias", "rule.init_lr",
                "rule.max_step", "rule.layers", "rule.weights")
BASELINE_RULE = ("rule.layers", "rule.weights", "rule.dyneval_weights", "rule.dyneval_eps", "rule.grad_stat",
                 "rule.grad_stat_streams", "rule.grad_rms_chunks", "rule.max_step",
                 "rule.cache_window")  # the baselines' settings that tuning does not search


def static_key(cfg_dict: dict) -> dict:
    """Same model + data + train config = the same static LM."""
    return _select(cfg_dict, ("model", "data", "train", "run.bf16"), STATIC_IGNORE)


def meta_key(cfg_dict: dict) -> dict:
    """Same model + data + learner + meta config (on the same base) = the same meta-training run."""
    keys, ignore = ["model", "data", "meta", "eval.segment_length", *LEARNER_RULE], list(META_IGNORE)
    if cfg_dict.get("meta", {}).get("eval_every", 0):  # repeated validations pick best.pt
        keys += ["eval.batch_size", "eval.boundary"]
    else:  # validated once, at the end: it picks nothing
        ignore.append("meta.valid_articles")
    key = _select(cfg_dict, keys, [*ignore, "meta.max_tokens"])
    # the steps the run takes, however given (meta.steps, meta.max_tokens): equal budgets are one run
    flat = {**defaults(), **flatten_config(cfg_dict)}
    key["meta.steps"] = step_limit(flat["meta.steps"], flat["meta.max_tokens"],
                                   flat["meta.batch_size"] * flat["meta.unroll"] * flat["eval.segment_length"])
    return key


_DEFAULTS: list[dict] = []


def defaults() -> dict:
    """Every setting's default, flattened (dotted names)."""
    if not _DEFAULTS:
        _DEFAULTS.append(flatten_config(to_dict(Config())))
    return _DEFAULTS[0]


def _mismatches(saved: dict, wanted: dict) -> list[str]:
    """Differences between two selected keys. A setting the saved run predates ran as its default does
    (a new setting's default keeps the old behaviour), so it matches only a wanted default value; one
    without a default (or whose default is not comparable) is not compared."""
    out = []
    for k, v in wanted.items():
        have = saved[k] if k in saved else defaults().get(k, v)
        if have != v:
            out.append(f"{k}: {have!r} vs {v!r}" + ("" if k in saved else " (a setting the run predates)"))
    return out


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


_FINGERPRINTS: dict[tuple, str] = {}


def weights_fingerprint(path: Path, ck: dict | None = None, with_learner: bool = True) -> str:
    """sha1 of a checkpoint's weights (and learner): what tuning and evaluation results depend on.
    Cached per file version, so planning and running do not hash the same file twice."""
    st = Path(path).stat()
    cache_key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size, with_learner)
    if cache_key not in _FINGERPRINTS:
        ck = ck if ck is not None else load_checkpoint(path)
        parts = [params_fingerprint(ck["params"])]
        if with_learner and ck.get("learner"):
            parts.append(params_fingerprint(ck["learner"]))
        _FINGERPRINTS[cache_key] = "+".join(parts)
    return _FINGERPRINTS[cache_key]


def _read_json(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(obj, indent=2, default=str), encoding="utf-8")  # strict JSON: inf/nan are null
    os.replace(tmp, path)
