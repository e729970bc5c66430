"""`dynlm experiment NAME`: one command per experiment of Wolf, Chaumond & Delangue (2018), at
CPU scale (WikiText-2, a small model) or paper scale (WikiText-103, an AWD-LSTM-sized model, GPU).

An experiment is a list of YAML override files from experiments/ (the defaults stay in config.py)
and a pipeline of stages, each run through the same function as its own CLI command:

    prepare    data + tokenizer of the base model          train.setup.prepare_data
    train      the static LM (the base model)              train.static.train_static
    metatrain  the learned rule, one run per arm           train.meta.metatrain
    tune       the compared baselines, on the base weights tune.tune_checkpoint
    evaluate   every mode per article on valid, per arm    run_eval.evaluate_checkpoint
    report     RUNS/experiments/SCALE/NAME/experiment.json, experiments/RESULTS.md, README's table

Stages are keyed by what they compute, not by the experiment that asks for them: a static run is
reused by every experiment whose model, data and train settings match its saved config (found
anywhere under RUNS/, e.g. a run made by hand with `dynlm train`), a meta-training run by every arm
with the same base, learner and meta settings, a tuning by every experiment that tunes the same
weights under the same evaluation settings, and an evaluation whose recorded key (checkpoint
weights, modes, eval/rule/data/model settings) matches is not repeated. So re-running an experiment
is cheap, an interrupted one continues where it stopped, and the ablations share their reference arm.
"""
from __future__ import annotations

import copy
import dataclasses
import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import torch
import yaml

from .checkpoint import flatten_config, latest_checkpoint, load_checkpoint
from .config import Config, ConfigError, load_config, save_config, to_dict
from .data.errors import DataError
from .data.wikitext import wikitext_files
from .run_eval import check_modes, evaluate_checkpoint, params_fingerprint
from .gitinfo import git_state
from .report import render_report
from .signals import signal_exit_code
from .textio import dumps, number, open_csv, read_json, read_text
from .train.meta import check_meta_config, metatrain
from .train.setup import prepare_data
from .train.static import check_train_config, train_static
from .modes import PROTOCOLS, parse_mode, protocol_of
from .tune import (TUNABLE, article_range, explicit_rule_keys, mode_grids, read_tuned, tune_checkpoint, tune_dir, tune_order,
                   tuned_in_effect, tuned_path)
from .experiments_registry import (experiment_file, WORD_VOCAB, BASES, CORPUS, EXPERIMENTS, EXPERIMENTS_DIR, META_FILES, README_FILE, REPO,
                                   RESULTS_FILE, SCALES, SPLIT, Arm, Experiment, at_scale, get_experiment)

RECORD = "runner.json"  # what the runner wrote next to a stage's outputs: its key, commit, command

# ---- configs --------------------------------------------------------------------------------------
STATIC_SECTIONS = ("model", "data", "train", "log")  # the command-line overrides the base model sees


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
STATIC_IGNORE = ("data.cache_dir", "train.log_every", "train.keep_checkpoints", "train.max_bad_steps", "train.device")
META_IGNORE = ("data.cache_dir", "meta.log_every", "meta.checkpoint_every", "meta.keep_checkpoints",
               "meta.max_bad_steps")
LEARNER_RULE = ("rule.learner", "rule.learner_hidden", "rule.learner_features", "rule.forget_bias", "rule.init_lr",
                "rule.max_step", "rule.layers", "rule.weights")
BASELINE_RULE = ("rule.layers", "rule.weights", "rule.dyneval_weights", "rule.dyneval_eps", "rule.grad_stat",
                 "rule.grad_stat_streams", "rule.grad_rms_chunks", "rule.max_step",
                 "rule.cache_window")  # the baselines' settings that tuning does not search


def static_key(cfg_dict: dict) -> dict:
    """Same model + data + train config = the same static LM."""
    return _select(cfg_dict, ("model", "data", "train"), STATIC_IGNORE)


def meta_key(cfg_dict: dict) -> dict:
    """Same model + data + learner + meta config (on the same base) = the same meta-training run."""
    keys, ignore = ["model", "data", "meta", *LEARNER_RULE], list(META_IGNORE)
    if cfg_dict.get("meta", {}).get("eval_every", 0):  # repeated validations pick best.pt
        keys += ["eval.segment_length", "eval.batch_size", "eval.boundary"]
    else:  # validated once, at the end: it picks nothing
        ignore.append("meta.valid_articles")
    return _select(cfg_dict, keys, ignore)


def _mismatches(saved: dict, wanted: dict) -> list[str]:
    """Differences between two selected keys; settings the saved run predates are not compared."""
    return [f"{k}: {saved[k]!r} vs {v!r}" for k, v in wanted.items() if k in saved and saved[k] != v]


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


# ---- finding runs to reuse ------------------------------------------------------------------------
@dataclass
class FoundRun:
    run_dir: Path
    finished: bool
    progress: str  # "step 7848, 37.5 min"
    owned: bool  # made by the runner (under RUNS/experiments): it may resume it


def _run_progress(ck: dict, kind: str, cfg: Config) -> tuple[bool, str]:
    """Whether the run in `ck` has reached its budget (steps, epochs or minutes), as its loop decides."""
    step, minutes = ck.get("step") or 0, ck.get("minutes") or 0.0
    text = f"step {step}, {minutes:.1f} min"
    if kind == "static":
        t = cfg.train
        epochs_done = not t.max_steps and t.epochs and (ck.get("epoch") or 0) >= t.epochs  # max_steps wins
        done = (t.max_steps and step >= t.max_steps) or epochs_done or (t.max_minutes and minutes >= t.max_minutes)
    else:
        m = cfg.meta
        done = step >= m.steps or (m.max_minutes and minutes >= m.max_minutes)
    return bool(done), text


_INFO: dict[tuple, dict] = {}


def checkpoint_info(path: Path) -> dict:
    """kind, config and progress of a checkpoint, read through mmap (the tensors stay on disk) and
    cached per file version: planning looks at the same checkpoints many times."""
    st = Path(path).stat()
    cache_key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if cache_key not in _INFO:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        _INFO[cache_key] = {k: ck.get(k) for k in ("kind", "config", "step", "minutes", "epoch", "base_checkpoint")}
    return _INFO[cache_key]


def _inside(path: Path, root: Path) -> bool:
    return Path(root).resolve() in Path(path).resolve().parents


def _candidate_dirs(runs: Path, owned: Path, preferred: str) -> list[Path]:
    """Run directories that may hold a reusable run: the files' own log.out_dir first (when it lies
    under RUNS/), then the runner's, then any other directly under RUNS/."""
    seen, out = set(), []
    first = [Path(preferred)] if _inside(preferred, runs) else []
    for d in [*first, *sorted(owned.glob("*")), *sorted(runs.glob("*"))]:
        r = d.resolve()
        if r not in seen and (d / "config.yaml").is_file() and (d / "checkpoints").is_dir():
            seen.add(r)
            out.append(d)
    return out


def find_run(kind: str, cfg: Config, key_fn: Callable[[dict], dict], runs: Path, owned: Path,
             accept: Callable[[dict, Path], str | None] = lambda ck, d: None,
             explain: bool = True) -> tuple[FoundRun | None, list[str]]:
    """The best run of `kind` ('static' | 'meta') whose saved config matches cfg under key_fn:
    a finished one, else an unfinished one the runner owns (to resume). Also returns notes on near
    misses: matching but unfinished runs of others, and (explain) why cfg.log.out_dir does not match."""
    wanted, notes, unfinished = key_fn(to_dict(cfg)), [], None
    for d in _candidate_dirs(runs, owned, cfg.log.out_dir):
        is_owned = _inside(d, owned)
        try:
            saved = yaml.safe_load(read_text(d / "config.yaml")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        diff = _mismatches(key_fn(saved), wanted)
        if diff:
            if explain and d.resolve() == Path(cfg.log.out_dir).resolve():
                notes.append(f"not reusing {d}: {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}")
            continue
        path = latest_checkpoint(d / "checkpoints")
        if path is None:
            continue
        try:
            ck = checkpoint_info(path)
        except Exception as e:  # noqa: BLE001 - an unreadable candidate is just not reused
            notes.append(f"not reusing {d}: {path} cannot be read ({type(e).__name__})")
            continue
        problem = (f"a {ck.get('kind')!r} run" if ck.get("kind") != kind else
                   "; ".join(_mismatches(key_fn(ck.get("config") or {}), wanted)) or accept(ck, d))
        if problem:
            continue
        finished, progress = _run_progress(ck, kind, cfg)
        if finished:
            return FoundRun(d, True, progress, is_owned), notes
        if is_owned and unfinished is None:
            unfinished = FoundRun(d, False, progress, True)
        elif not is_owned:
            notes.append(f"not reusing {d} yet: it matches but has not finished ({progress}); once it has "
                         "(or has been continued with its own command and --resume), it is reused")
    return unfinished, notes


def best_or_last(run_dir: Path) -> Path:
    """The checkpoint later stages read: best.pt (best validation), else the newest."""
    best = run_dir / "checkpoints" / "best.pt"
    return best if best.is_file() else (latest_checkpoint(run_dir / "checkpoints") or best)


# ---- stages ---------------------------------------------------------------------------------------
class Stopped(Exception):
    """SIGINT/SIGTERM ended a training stage after its checkpoint: the runner stops, resumable."""

    def __init__(self, rc: int):
        super().__init__(rc)
        self.rc = rc


@dataclass
class Stage:
    kind: str  # prepare | train | metatrain | tune | evaluate | report
    label: str
    check: Callable[[], tuple[bool, str]]  # (done, what is there / what will happen)
    run: Callable[[], None]
    budget: str = ""


DIRTY_PATHS = ("dynlm", "experiments/*.yaml", "pyproject.toml")  # what the numbers depend on (not the docs
# and not RESULTS.md, which the runner itself rewrites)


def git_commit() -> str:
    """HEAD of the repository, '+dirty' when its code or experiment files have uncommitted changes."""
    head, dirty = git_state(DIRTY_PATHS)
    return "unknown" if head is None else head[:12] + ("+dirty" if dirty else "")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _with_out(cfg: Config, run_dir: Path) -> Config:
    c = copy.deepcopy(cfg)
    c.log.out_dir = str(run_dir)
    return c


def _stopped(result: dict) -> None:
    if result.get("stopped_by"):
        raise Stopped(signal_exit_code(result["stopped_by"]))


def describe_data(cfg: Config) -> str:
    d = cfg.data
    where = {"wikitext": f"WikiText files in {d.path}", "hub": f"{d.hub_name} {d.hub_config} from the hub",
             "synthetic": "the synthetic corpus"}.get(d.source, f"{d.source} files in {d.path}")
    pieces = f" ({d.sp_vocab_size} pieces)" if d.tokenizer == "sentencepiece" else ""
    return f"{where}, {d.tokenizer} tokenizer{pieces}"


def describe_learner(cfg: Config) -> str:
    m, r = cfg.meta, cfg.rule
    parts = [f"{r.learner} learner" + (f" (hidden {r.learner_hidden})" if r.learner_hidden else ""),
             f"K={m.unroll} x {m.chunk} tokens", "second-order" if m.second_order else "first-order",
             f"boundary {m.boundary}", f"layers {r.layers or 'all'}", f"weights {r.weights}"]
    if m.theta0_lr:
        parts.append(f"theta0 learned (outer lr {m.theta0_lr:g})")
    if m.ewc_lambda:
        parts.append(f"EWC {m.ewc_lambda:g}")
    return ", ".join(parts)


def _budget(minutes: float, steps: int = 0, epochs: int = 0) -> str:
    """The limit that ends a training stage first, as its loop applies them."""
    if minutes:
        return f"budget {minutes:g} min"
    return f"{steps} steps" if steps else (f"{epochs} epochs" if epochs else "")


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def take_modes(src: Path, out: Path, modes: list[str], report_cfg) -> None:
    """An evaluation directory holding only `modes` of the evaluation in `src` (same tokens, same
    numbers), its report rendered again for them."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    summary = _read_json(src / "summary.json")
    summary["modes"] = {m: v for m, v in summary["modes"].items() if m in modes}
    for key in ("settings", "scored_by"):  # what the modes taken ran with, and nothing of the others
        if key in summary:
            summary[key] = {m: v for m, v in summary[key].items() if m in modes}
    if isinstance(summary.get("tuned"), dict) and "modes" in summary["tuned"]:
        summary["tuned"]["modes"] = {m: v for m, v in summary["tuned"]["modes"].items() if m in modes}
    _write_json(out / "summary.json", summary)
    for name in ("per_article.csv", "drift.csv"):  # one row per mode and article / position
        if (src / name).is_file():
            with open_csv(src / name) as f:
                rows = list(csv.DictReader(f))
            if rows:
                with open_csv(out / name, "w") as f:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(r for r in rows if r["mode"] in modes)
    table = pq.read_table(src / "tokens.parquet")
    keep = [c for c in table.column_names if not c.startswith("nll_") or c.removeprefix("nll_") in modes]
    pq.write_table(table.select(keep), out / "tokens.parquet")
    render_report(out, report_cfg)


def generated_files(runs: Path, results_file: str | None, readme: str | None) -> tuple[Path | None, Path | None]:
    """Where the runner writes its tables: where asked (--results-file / --readme; '' = nowhere), else the
    repository's experiments/RESULTS.md and README.md only when run from the repository root with its runs
    inside it; from anywhere else the installed repository's files are not its to rewrite."""
    in_repo = Path.cwd().resolve() == REPO and _inside(Path(runs).resolve(), REPO)
    if (results_file is None or readme is None) and not in_repo:
        print(f"note: not rewriting {RESULTS_FILE} or {README_FILE} (run from outside the repository root, or "
              f"--runs outside it); --results-file / --readme name files to write")

    def chosen(given: str | None, repo_file: Path) -> Path | None:
        if given is None:
            return repo_file if in_repo else None
        return Path(given) if given else None

    return chosen(results_file, RESULTS_FILE), chosen(readme, README_FILE)


def data_problem(cfg: Config) -> str | None:
    """Why the base model's corpus cannot be read from here (None when it can): a WikiText directory is
    looked for relative to the current directory, so a run from elsewhere misses the default one."""
    d = cfg.data
    if d.source != "wikitext":
        return None  # hub: downloaded (or cached) by `datasets`; synthetic: generated
    splits = ("train", SPLIT)
    missing = [s for s in splits if not any(f.is_file() for f in wikitext_files(d.path, s))]
    if not missing:
        return None
    where = Path(d.path)
    return (f"the WikiText data is not at data.path={d.path} ({where.resolve()}, relative to the current directory "
            f"{Path.cwd()}): no {' or '.join(f'wiki.{s}.tokens / {s}.txt' for s in missing)} there. Point "
            f"--data-dir DIR at a copy (wiki.SPLIT.tokens or SPLIT.txt), run from the directory the path is relative "
            f"to, or read it from the hub: --data.source=hub --data.hub_config=wikitext-2-v1 (needs the internet)")


REDOABLE = ("tune", "evaluate")  # stages --redo may repeat in place (training stages own their run dirs)


class ExperimentRunner:
    """The stages of one experiment at one scale; `plan_text()` lists them, `run()` executes them.
    redo: stage kinds (of REDOABLE) to run again even when done, e.g. to check that they reproduce."""

    def __init__(self, exp: Experiment, scale: str, overrides: list[str], runs: Path, command: str,
                 results_file: Path | None = None, readme: Path | None = None, redo=()):
        bad = sorted(set(redo) - set(REDOABLE))
        if bad:
            raise ConfigError(f"--redo {','.join(bad)}: only {', '.join(REDOABLE)} can be redone in place")
        self.exp, self.scale, self.overrides, self.command = exp, scale, list(overrides), command
        self.redo = set(redo)
        self.runs = Path(runs)
        self.root = self.runs / "experiments" / scale
        self.exp_dir = self.root / exp.name
        self.results_file, self.readme = results_file, readme
        self.configs = experiment_configs(exp, scale, overrides)
        self.commit = git_commit()

    # -- the base model -------------------------------------------------------------------------
    def base_run(self) -> tuple[FoundRun | None, Path, list[str]]:
        """(reusable or resumable run, the directory the base lives or will live in, notes)."""
        cfg = self.configs.static
        found, notes = find_run("static", cfg, static_key, self.runs, self.root / "static")
        new_dir = self.root / "static" / f"{self.exp.base}-{_digest(static_key(to_dict(cfg)))}"
        return found, (found.run_dir if found else new_dir), notes

    def base_checkpoint(self) -> Path:
        return best_or_last(self.base_run()[1])

    # -- meta-training --------------------------------------------------------------------------
    def meta_run(self, ac: ArmConfig) -> tuple[FoundRun | None, Path, list[str]]:
        base_ckpt = self.base_checkpoint()
        if not base_ckpt.is_file():
            slug = self._meta_dir_name(ac.cfg)
            return None, self.root / "meta" / slug, []
        base_fp = weights_fingerprint(base_ckpt, with_learner=False)

        def same_base(ck: dict, run_dir: Path) -> str | None:
            record = _read_json(run_dir / RECORD)
            if record and "base_fingerprint" in record:
                return None if record["base_fingerprint"] == base_fp else "another base model"
            init = ck.get("base_checkpoint")  # a run started by hand: compare where it started from
            return None if init and Path(init).resolve() == base_ckpt.resolve() else "another base checkpoint"

        # the meta files' own log.out_dir is this arm's conventional place only when nothing is added to them
        plain = not at_scale(self.exp.files, self.scale) and not at_scale(ac.arm.files, self.scale)
        found, notes = find_run("meta", ac.cfg, meta_key, self.runs, self.root / "meta", accept=same_base,
                                explain=plain)
        return found, (found.run_dir if found else self.root / "meta" / self._meta_dir_name(ac.cfg)), notes

    def _meta_dir_name(self, cfg: Config) -> str:
        m, r = cfg.meta, cfg.rule
        slug = (f"{self.exp.base}-{r.learner}{r.learner_hidden or ''}-k{m.unroll}-o{2 if m.second_order else 1}-"
                f"{m.boundary}" + (f"-ewc{m.ewc_lambda:g}" if m.ewc_lambda else "")
                + (f"-layers{'_'.join(map(str, r.layers))}" if r.layers else ""))
        # the base model is part of the identity: same settings over another base = another run
        return f"{slug}-{_digest([meta_key(to_dict(cfg)), static_key(to_dict(self.configs.static))])}"

    def checkpoint_for(self, ac: ArmConfig) -> Path:
        """What an arm evaluates: its meta-trained checkpoint, or the base model."""
        return best_or_last(self.meta_run(ac)[1]) if self.learner else self.base_checkpoint()

    def tune_target(self, ac: ArmConfig) -> Path:
        """The checkpoint whose weights the baselines read. Meta-training with theta0 and the static
        weights fixed leaves the base weights as they were, so the base is tuned once for everyone."""
        m = ac.cfg.meta
        if self.learner and (m.theta0_lr > 0 or m.static_lr > 0):
            return self.checkpoint_for(ac)
        return self.base_checkpoint()

    # -- keys of tuning and evaluation ----------------------------------------------------------
    def tune_key(self, ckpt: Path, cfg: Config, mode: str, learner: Path | None = None) -> dict:
        axes = mode_grids(parse_mode(mode), cfg)
        settings = _select(to_dict(cfg), ("data", "model", "eval.segment_length", "eval.batch_size", "eval.boundary",
                                          "tune.split", "tune.articles", "tune.tokens", "tune.skip_articles",
                                          "tune.reference_segment_length", "tune.combo_axes",
                                          "tune.max_extensions", *[f"tune.{a}" for a in axes], *BASELINE_RULE,
                                          "train.bf16"), ("data.cache_dir",))
        key = {"weights": weights_fingerprint(ckpt, with_learner=False), "mode": mode, **settings}
        if learner is not None:  # learned+cache: the learner is part of what was tuned
            key["learner"] = weights_fingerprint(learner) if learner.is_file() else None
        return key

    def explicit_rule_keys(self, ac: ArmConfig) -> set[str]:
        """rule.* keys the arm's files or the command line set: they win over RUN/tuned.yaml."""
        return explicit_rule_keys(ac.files, self.overrides)

    def eval_cfg(self, ac: ArmConfig) -> tuple[Config, dict | None]:
        """The arm's config, and the tuned values per mode that `evaluate` puts over it (as `dynlm evaluate`
        loads RUN/tuned.yaml; the arm's files and overrides still win): {"path", "target", "modes"}."""
        if not self.exp.tune:
            return ac.cfg, None
        target = self.tune_target(ac)
        tuned = tuned_path(target, ac.cfg)
        if not tuned.is_file():
            return ac.cfg, None
        modes = {m: v for m, v in read_tuned(tuned).items() if m in self.all_modes}
        return ac.cfg, {"path": tuned, "target": target, "modes": modes,
                        "explicit": sorted(self.explicit_rule_keys(ac) & TUNABLE)}

    @property
    def learner(self) -> bool:
        """Whether the experiment reads a meta-trained learner: then every mode of it, also of a `--modes`
        run without a learned one, is scored on the meta-trained checkpoint (one evaluation, one model)."""
        return EXPERIMENTS.get(self.exp.name, self.exp).learner

    @property
    def all_modes(self) -> tuple[str, ...]:
        """The experiment's modes, also those a `--modes` run leaves out (its evaluation keeps their scores)."""
        full = EXPERIMENTS.get(self.exp.name)
        return tuple(dict.fromkeys((*full.modes, *self.exp.modes))) if full else self.exp.modes

    def eval_key(self, ckpt: Path, cfg: Config, tuned: dict | None = None, modes=None) -> dict:
        modes = list(self.exp.modes if modes is None else modes)
        settings = _select(to_dict(cfg), ("eval", "rule", "data", "model", "train.bf16"),
                           ("eval.modes", "rule.compile", "data.cache_dir"))
        return {"weights": weights_fingerprint(ckpt), "split": SPLIT, "modes": modes, **settings,
                "tuned": {m: v for m, v in (tuned or {}).get("modes", {}).items() if m in modes},
                "explicit": (tuned or {}).get("explicit", [])}

    def eval_dir(self, ac: ArmConfig) -> Path:
        return self.exp_dir / ac.arm.name / f"eval_{SPLIT}"

    # -- the plan -------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        exp, static = self.exp, self.configs.static
        out: list[Stage] = []

        def check_prepare():
            _, base_dir, _ = self.base_run()
            tok = base_dir / "tokenizer"
            return (True, f"done: {tok}") if tok.is_dir() else (False, f"build the tokenizer and token cache -> {tok}")

        def run_prepare():
            _, base_dir, _ = self.base_run()
            prepare_data(_with_out(static, base_dir), base_dir, ["train", SPLIT])

        out.append(Stage("prepare", f"{describe_data(static)} (base '{exp.base}')", check_prepare, run_prepare))

        def check_train():
            found, base_dir, notes = self.base_run()
            extra = "".join(f"\n        {n}" for n in notes)
            if found and found.finished:
                return True, f"reusing {base_dir} (model/data/train config matches; finished: {found.progress}){extra}"
            if found:
                return False, f"resume {base_dir} ({found.progress}){extra}"
            return False, f"train -> {base_dir}{extra}"

        def run_train():
            found, base_dir, _ = self.base_run()
            result = train_static(_with_out(static, base_dir), base_dir, resume=found is not None)
            _stopped(result)

        out.append(Stage("train", f"static LM: {static.model.n_layers} x {static.model.hidden_size} LSTM, "
                                  f"{static.model.emb_size}-d embeddings, {static.model.softmax} softmax",
                         check_train, run_train,
                         _budget(static.train.max_minutes, static.train.max_steps, static.train.epochs)))

        if self.learner:
            for ac in self.configs.arms:
                out.append(self._meta_stage(ac))
        for target_arms in self._tune_groups():
            out.append(self._tune_stage(target_arms))
        for ac in self.configs.arms:
            out.append(self._eval_stage(ac))
        out.append(Stage("report", f"{self.exp_dir / 'experiment.json'}"
                                   + (f", {self.results_file}" if self.results_file else "")
                                   + (f", {self.readme}" if self.readme else ""),
                         lambda: (False, "write"), self.report))
        return out

    def _meta_stage(self, ac: ArmConfig) -> Stage:
        def check():
            found, run_dir, notes = self.meta_run(ac)
            extra = "".join(f"\n        {n}" for n in notes)
            if found and found.finished:
                return True, (f"reusing {run_dir} (base, learner and meta config match; finished: "
                              f"{found.progress}){extra}")
            if not self.base_checkpoint().is_file():
                return False, f"meta-train (after the base) -> {run_dir}"
            return False, (f"resume {run_dir} ({found.progress})" if found else f"meta-train -> {run_dir}") + extra

        def run():
            found, run_dir, _ = self.meta_run(ac)
            base_ckpt = self.base_checkpoint()
            if found is None:
                _write_json(run_dir / RECORD, {"base_checkpoint": str(base_ckpt), "commit": self.commit,
                                               "base_fingerprint": weights_fingerprint(base_ckpt, with_learner=False),
                                               "command": self.command, "started": _now()})
            result = metatrain(_with_out(ac.cfg, run_dir), run_dir, init=base_ckpt, resume=found is not None)
            _stopped(result)

        return Stage("metatrain", f"arm {ac.arm.name}: {describe_learner(ac.cfg)}", check, run,
                     _budget(ac.cfg.meta.max_minutes, ac.cfg.meta.steps))

    def _tune_groups(self) -> list[list[ArmConfig]]:
        """Arms grouped by the checkpoint their baselines are tuned on (one group in practice)."""
        if not self.exp.tune:
            return []
        groups: dict[str, list[ArmConfig]] = {}
        for ac in self.configs.arms:
            groups.setdefault(str(self.tune_target(ac)), []).append(ac)
        return list(groups.values())

    def _tune_stage(self, arms: list[ArmConfig]) -> Stage:
        ac, modes = arms[0], list(self.exp.tune)
        t = ac.cfg.tune
        # learned+cache reads the arm's learner (tuned once, with the first arm's: one arm in practice)
        learner = self.checkpoint_for(ac) if any(parse_mode(m).rule == "learned" for m in modes) else None

        def todo() -> tuple[Path, list[str]]:
            target = self.tune_target(ac)
            if not target.is_file():
                return target, modes
            records = _read_json(tune_dir(target, ac.cfg) / RECORD) or {}
            tuned = tuned_path(target, ac.cfg)
            have = read_tuned(tuned) if tuned.is_file() else {}

            def parents_now(m) -> dict:  # what a MODE+cache starts from: MODE's and the cache's tuned values
                spec = parse_mode(m)
                start = dict(have.get(spec.base.name, {}))
                if "cache_theta" in have.get("cache", {}):
                    start["cache_theta"] = have["cache"]["cache_theta"]
                return start

            def done(m):  # same key, and tuned.yaml still holds what that tuning found (not edited since)
                r = records.get(m, {})
                key = self.tune_key(target, ac.cfg, m, learner if parse_mode(m).rule == "learned" else None)
                ok = r.get("key") == key and bool(r.get("values")) and have.get(m) == r["values"]
                if ok and parse_mode(m).cache and parse_mode(m).adapts:  # started from its parents' values now?
                    ok = all(r["values"].get(k) == v for k, v in parents_now(m).items())
                return ok
            missing = {m for m in modes if m in self.redo_modes or not done(m)}
            # a MODE+cache starts from MODE's and the cache's tuned values: retuned with them
            missing |= {m for m in modes if parse_mode(m).cache and parse_mode(m).adapts
                        and ({parse_mode(m).base.name, "cache"} & missing)}
            # parents before their combinations, whatever order the modes were given in
            return target, [m.name for m in tune_order([parse_mode(m) for m in modes if m in missing])]

        def check():
            target, missing = todo()
            where = f"{tuned_path(target, ac.cfg)}"
            if not missing:
                return True, f"done: {where} (tuned on these weights and settings)"
            return False, f"tune {', '.join(missing)} -> {where}"

        def run():
            target, missing = todo()
            ck = load_checkpoint(target)
            learner_state = load_checkpoint(learner)["learner"] if learner is not None else None
            path = tune_dir(target, ac.cfg) / RECORD
            for m in missing:  # one mode at a time, each recorded as it finishes: a stopped tuning resumes
                started = time.perf_counter()
                result = tune_checkpoint(ck, target, ac.cfg, [m], t.split, t.articles, t.skip_articles,
                                         learner_state=learner_state)
                records = _read_json(path) or {}
                records[m] = {"key": self.tune_key(target, ac.cfg, m, learner if parse_mode(m).rule == "learned" else None),
                              "values": result["best"][m], "on_edge": result["on_edge"][m],
                              "tuned_on": {k: result[k] for k in ("split", "skip_articles", "n_articles", "n_tokens",
                                                                  "protocol")},
                              "commit": self.commit, "command": self.command, "finished": _now(),
                              "seconds": time.perf_counter() - started}
                _write_json(path, records)

        where = (article_range(t.skip_articles, t.articles) if t.articles
                 else f"articles after the first {t.skip_articles} (at least {t.tokens:,} tokens)")
        return Stage("tune", f"{', '.join(modes)} on {t.split} {where}, protocol {protocol_of(ac.cfg.eval)}",
                     check, run)

    def _eval_stage(self, ac: ArmConfig) -> Stage:
        def kept(ckpt: Path, cfg: Config, tuned: dict | None) -> list[str]:
            """Modes of the evaluation already in the arm's directory that stand as they are: scored on
            these weights, articles and settings, each with the tuned values it would run with now, and
            still modes of the experiment. A run (with `--modes`, or after a mode was added) scores only
            the others and keeps these beside them, instead of scoring every column again."""
            out = self.eval_dir(ac)
            record = _read_json(out / RECORD)
            if "evaluate" in self.redo or not ckpt.is_file() or not record or not (out / "summary.json").is_file():
                return []
            old, new = record.get("key") or {}, self.eval_key(ckpt, cfg, tuned, self.all_modes)
            if _without(old, "modes", "tuned") != _without(new, "modes", "tuned"):
                return []
            return [m for m in old.get("modes", ()) if m in self.all_modes
                    and old.get("tuned", {}).get(m) == new["tuned"].get(m)]

        def state() -> tuple[Path, Config, dict | None, list[str], list[str]]:
            """The checkpoint, config, tuned values, the modes the evaluation will hold (the asked ones and
            those kept, in the experiment's order) and the modes kept."""
            ckpt = self.checkpoint_for(ac)
            cfg, tuned = self.eval_cfg(ac)
            keep = kept(ckpt, cfg, tuned)
            modes = [m for m in self.all_modes if m in self.exp.modes or m in keep]
            return ckpt, cfg, tuned, modes, keep

        def others() -> list[tuple[Path, dict]]:
            """(directory, recorded key) of every other experiment's finished evaluation."""
            own, found = self.eval_dir(ac).resolve(), []
            for record_path in sorted(self.root.glob(f"*/*/eval_{SPLIT}/{RECORD}")):
                d = record_path.parent
                if d.resolve() != own and (d / "summary.json").is_file():
                    found.append((d, (_read_json(record_path) or {}).get("key") or {}))
            return found

        def same_elsewhere(ckpt: Path, cfg: Config, tuned: dict | None) -> Path | None:
            """Another experiment's evaluation with this key (the ablations share their reference arm)."""
            if "evaluate" in self.redo or not ckpt.is_file():
                return None
            key = self.eval_key(ckpt, cfg, tuned)
            return next((d for d, other in others() if other == key), None)

        def superset_elsewhere(ckpt: Path, cfg: Config, tuned: dict | None) -> Path | None:
            """Another experiment's evaluation of the same base weights, settings and articles with more
            modes (the baselines inside 2-level): without `learned`, the learner is not read, so this
            evaluation is those modes' results, taken out of it rather than computed again."""
            if "evaluate" in self.redo or self.learner or not ckpt.is_file():
                return None
            settings = _without(self.eval_key(ckpt, cfg, tuned), "weights", "modes", "tuned", "explicit")
            mine = self.eval_key(ckpt, cfg, tuned)["tuned"]
            base = weights_fingerprint(ckpt, with_learner=False)

            def same_tuned(other: dict) -> bool:  # the modes taken ran with the same tuned values
                return all(other.get("tuned", {}).get(m) == mine.get(m) for m in self.exp.modes)
            return next((d for d, other in others() if _without(other, "weights", "modes", "tuned", "explicit") == settings
                         and same_tuned(other)
                         and set(self.exp.modes) <= set(other.get("modes", ()))
                         and str(other.get("weights", "")).split("+")[0] == base), None)

        def check():
            ckpt, cfg, tuned, modes, keep = state()
            out = self.eval_dir(ac)
            if set(self.exp.modes) <= set(keep):
                return True, f"done: {out} (same weights, modes and settings)"
            other = None if keep else same_elsewhere(ckpt, cfg, tuned)
            if other:
                return False, f"copy {other} (same weights, modes and settings) -> {out}"
            other = None if keep else superset_elsewhere(ckpt, cfg, tuned)
            if other:
                return False, f"take {', '.join(self.exp.modes)} out of {other} (same base weights and settings) -> {out}"
            kept_note = f", keeping the scores of {', '.join(keep)} there" if keep else ""
            return False, (f"evaluate {', '.join(m for m in modes if m not in keep)} of {ckpt} -> {out}{kept_note}")

        def run():
            ckpt, cfg, tuned, modes, keep = state()
            out = self.eval_dir(ac)
            other = None if keep else same_elsewhere(ckpt, cfg, tuned)
            if other:  # its record (commit, command, time) stays with the copied numbers
                shutil.rmtree(out, ignore_errors=True)
                shutil.copytree(other, out)
                save_config(cfg, out.parent / "config.yaml")
                return
            other = None if keep else superset_elsewhere(ckpt, cfg, tuned)
            if other:
                take_modes(other, out, list(self.exp.modes), cfg.report)
                record = _read_json(other / RECORD)
                scored_by = {m: v for m, v in (record.get("scored_by") or {}).items() if m in self.exp.modes}
                _write_json(out / RECORD, {**record, "key": self.eval_key(ckpt, cfg, tuned), "taken_from": str(other),
                                           **({"scored_by": scored_by} if scored_by else {})})
                save_config(cfg, out.parent / "config.yaml")
                return
            previous = _read_json(out / "summary.json") if "evaluate" in self.redo else None
            if "evaluate" in self.redo:  # scores kept from an interrupted earlier run are not a reproduction
                shutil.rmtree(out / ".modes", ignore_errors=True)
            previous_threads = (_read_json(out / RECORD) or {}).get("threads") if previous else None
            ck = load_checkpoint(ckpt)
            scored = (0, cfg.eval.max_articles or 10**9)
            info = (tuned_in_effect(tuned["path"], tuned["target"], cfg, self.explicit_rule_keys(ac), scored)
                    if tuned else None)
            old_record = _read_json(out / RECORD) or {}
            started = time.perf_counter()
            evaluate_checkpoint(ck, ckpt, cfg, SPLIT, modes, out, tuned=info, keep=keep)
            save_config(cfg, out.parent / "config.yaml")
            this = {"commit": self.commit, "command": self.command, "finished": _now()}
            earlier = {k: old_record.get(k) for k in this}
            # who scored each mode: this run, or (kept) the run that scored it before
            scored_by = {m: (old_record.get("scored_by") or {}).get(m, earlier) if m in keep else this for m in modes}
            _write_json(out / RECORD, {"key": self.eval_key(ckpt, cfg, tuned, modes), "checkpoint": str(ckpt),
                                       **this, "seconds": time.perf_counter() - started,
                                       "threads": torch.get_num_threads(), "scored_by": scored_by})
            if previous:
                print(compare_summaries(previous, _read_json(out / "summary.json"),
                                        (previous_threads, torch.get_num_threads())))

        e = ac.cfg.eval
        articles = f"first {e.max_articles}" if e.max_articles else "all"
        return Stage("evaluate", f"arm {ac.arm.name}: {', '.join(self.exp.modes)} on {SPLIT} ({articles} articles, "
                                 f"segment length {e.segment_length}, boundary {e.boundary})", check, run)

    @property
    def redo_modes(self) -> set[str]:
        return set(self.exp.tune) if "tune" in self.redo else set()

    # -- the record and the tables --------------------------------------------------------------
    def report(self) -> None:
        arms = []
        for ac in self.configs.arms:
            entry = {"name": ac.arm.name, "files": [f.name for f in ac.files],
                     "eval_max_articles": ac.cfg.eval.max_articles, "eval_boundary": ac.cfg.eval.boundary,
                     "eval_streams": ac.cfg.eval.batch_size, "checkpoint": str(self.checkpoint_for(ac))}
            if self.learner:
                found, run_dir, _ = self.meta_run(ac)
                entry["meta_run"] = str(run_dir)
                if found:
                    entry["meta_progress"] = found.progress
            arms.append(entry)
        found, base_dir, _ = self.base_run()
        # the modes the arms' evaluations hold: this run's, and those kept from an earlier one
        held = {m for ac in self.configs.arms
                for m in ((_read_json(self.eval_dir(ac) / "summary.json") or {}).get("modes") or {})}
        present = [m for m in self.all_modes if m in held or m in self.exp.modes]
        _write_json(self.exp_dir / "experiment.json", {
            "experiment": self.exp.name, "title": self.exp.title, "scale": self.scale, "corpus": CORPUS[self.scale],
            "command": self.command, "updated": _now(), "commit": self.commit, "modes": present,
            "modes_left_out": [m for m in self.all_modes if m not in present],
            "tuned": list(self.exp.tune), "tune_articles": self.configs.arms[0].cfg.tune.articles,
            "tune_skip_articles": self.configs.arms[0].cfg.tune.skip_articles,
            "data": describe_data(self.configs.static),
            "base": {"name": self.exp.base, "run_dir": str(base_dir),
                     "files": [f.name for f in self.configs.static_files],
                     "progress": found.progress if found else None},
            "arms": arms})
        write_results(self.runs, self.results_file, self.readme)

    def plan_text(self) -> str:
        lines = [f"experiment {self.exp.name} at {self.scale} scale ({CORPUS[self.scale]}): {self.exp.title}",
                 f"  base files: {', '.join(f.name for f in self.configs.static_files)}"]
        problem = data_problem(self.configs.static)
        if problem:
            lines.append(f"  warning: {problem}")
        for ac in self.configs.arms:
            lines.append(f"  arm {ac.arm.name}: {', '.join(f.name for f in ac.files)}")
        for i, s in enumerate(self.stages(), 1):
            done, what = s.check()
            budget = f" [{s.budget}]" if s.budget else ""
            status = ("redo" if s.kind in self.redo else "skip") if done else "run "
            lines.append(f"  {i}. {s.kind:<9} {s.label}{budget}\n       {status}: {what}")
        return "\n".join(lines)

    def estimate_text(self, tflops: float, bandwidth_tb_s: float) -> str:
        """Expected cost of the base model's training and of every arm's meta-training at their
        configured sizes, extrapolated from short runs of the real-size model (see cost.py)."""
        from .cost import format_costs, meta_training_cost, static_training_cost
        static = self.configs.static
        vocab = static.data.sp_vocab_size if static.data.tokenizer == "sentencepiece" else WORD_VOCAB[self.scale]
        costs = [static_training_cost(static, vocab)]
        seen = set()
        for ac in self.configs.arms if self.learner else ():
            cost = meta_training_cost(ac.cfg, vocab)
            if cost["stage"] not in seen:
                seen.add(cost["stage"])
                costs.append({**cost, "stage": f"arm {ac.arm.name}: {cost['stage']}"})
        return (f"experiment {self.exp.name} at {self.scale} scale ({CORPUS[self.scale]}, vocabulary {vocab:,}): "
                f"expected cost per training step, extrapolated from short CPU runs of the real-size model\n\n"
                + format_costs(costs, tflops, bandwidth_tb_s))

    def run(self) -> None:
        print(self.plan_text(), flush=True)
        stages = self.stages()
        problem = data_problem(self.configs.static)
        if problem and not all(s.check()[0] and s.kind not in self.redo for s in stages if s.kind != "report"):
            raise DataError(f"{self.exp.name}: {problem}")
        for s in stages:
            done, what = s.check()  # again: an earlier stage may have produced or changed what this one reads
            if done and s.kind in self.redo:
                print(f"\n[{self.exp.name}] {s.kind}: done, redone (--redo): {what}", flush=True)
            elif done:
                print(f"\n[{self.exp.name}] {s.kind}: skipped, {what}", flush=True)
                continue
            print(f"\n[{self.exp.name}] {s.kind}: {s.label}\n  {what}", flush=True)
            started = time.perf_counter()
            s.run()
            minutes = (time.perf_counter() - started) / 60
            print(f"[{self.exp.name}] {s.kind}: finished in {minutes:.1f} min", flush=True)


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

    def cmp(a: str, b: str) -> str:
        gap = _ppl(m[b]) - _ppl(m[a])
        return (f"{a} {_ppl(m[a]):.2f} vs {b} {_ppl(m[b]):.2f}: {a} "
                + (f"wins by {gap:.2f} ppl" if gap > 0 else f"loses by {-gap:.2f} ppl"))
    parts = [cmp("learned", d) for d in ("dyneval@lstm", "dyneval", "adam") if d in m]
    # like for like: each learned rule against dyneval of the same weights (LSTM: dyneval@lstm, all: dyneval)
    parts += [cmp(a, b) for a, b in (("learned@all", "dyneval"), ("learned@all", "adam@all"),
                                     ("learned+cache", "dyneval+cache"),
                                     ("learned@all+cache", "dyneval+cache")) if a in m and b in m]
    best = min(m, key=lambda k: _ppl(m[k]))
    left_out = [mode for e in dict(PROTOCOL_EXPERIMENTS)["article"]
                for mode in (_record(records, scale, e) or {}).get("modes_left_out") or []]
    text = (f"**Headline** (`{s.get('protocol', '?')}` protocol, one base model, the first "
            f"{m['static']['n_articles']} validation articles; {tuning_clause(s, r)}): " + "; ".join(parts)
            + f". Best of the modes run: {best} ({_ppl(m[best]):.2f}, {100 * m[best]['rel_change_vs_static']:+.1f}% "
            f"vs static)" + (f"; not run here: {', '.join(left_out)}" if left_out else "") + ".")
    k = _summary(records, scale, "krause")
    if k and "dyneval" in k["modes"] and "static" in k["modes"]:
        km = k["modes"]
        kbest = min(km, key=lambda x: _ppl(km[x]))
        learned = (f"the learned rule meta-trained for it reaches {_ppl(km['learned']):.2f} "
                   f"({100 * km['learned']['rel_change_vs_static']:+.1f}%)" if "learned" in km
                   else "no learned rule has been meta-trained for that protocol yet")
        text += (f" Under `{k.get('protocol', '?')}` protocol (`dynlm experiment krause`; "
                 f"{tuning_clause(k, _record(records, scale, 'krause'))}), dyneval "
                 f"(all weights) reaches {_ppl(km['dyneval']):.2f} ({100 * km['dyneval']['rel_change_vs_static']:+.1f}% "
                 f"vs static), {learned}; best of the modes run there: {kbest} ({_ppl(km[kbest]):.2f}).")
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


# ---- entry point ----------------------------------------------------------------------------------
def experiment_command(name: str, scale: str, data_dir: str | None, overrides: list[str], runs: Path,
                       modes: list[str] | None = None) -> str:
    args = ["dynlm", "experiment", name, "--scale", scale] + (["--modes", ",".join(modes)] if modes else [])
    if data_dir:
        args += ["--data-dir", data_dir]
    if Path(runs) != Path("runs"):
        args += ["--runs", str(runs)]
    return shlex.join(args + [f"--{o.lstrip('-')}" for o in overrides])


def only_modes(exp: Experiment, modes: list[str] | None) -> Experiment:
    """The experiment restricted to `modes` (and static, the reference) for one run, tuned and evaluated
    in the order given, e.g. to get the most telling columns first on a slow machine; the record lists
    the modes left out."""
    if not modes:
        return exp
    unknown = sorted(set(modes) - set(exp.modes))
    if unknown:
        raise ConfigError(f"--modes {','.join(unknown)}: not modes of experiment {exp.name!r} "
                          f"({', '.join(exp.modes)})")
    order = ["static", *(m for m in modes if m != "static")]  # tuned and evaluated in the order given
    return dataclasses.replace(exp, modes=tuple(order), tune=tuple(m for m in order if m in exp.tune))


def run_experiments(name: str | None, scale: str = "cpu", overrides: list[str] = (), data_dir: str | None = None,
                    dry_run: bool = False, results_only: bool = False, runs: Path = Path("runs"),
                    results_file: Path | None = None, readme: Path | None = None,
                    redo: list[str] = (), estimate: tuple[float, float] | None = None,
                    modes: list[str] | None = None) -> int:
    """`dynlm experiment`: plan (--dry-run), estimate the cost of (--estimate), or run one experiment, or
    `all` in registry order; returns
    the exit code (128 + signal when a training stage was stopped, resumable by running it again)."""
    if results_only:
        write_results(runs, results_file, readme)
        return 0
    if not name:
        raise ConfigError(f"name an experiment: {', '.join(EXPERIMENTS)} (or 'all'), or pass --results")
    names = list(EXPERIMENTS) if name == "all" else [get_experiment(name).name]
    user = [o.lstrip("-") for o in overrides]
    data = ["data.source=wikitext", f"data.path={data_dir}"] if data_dir else []  # before the user's, which win
    runners = [ExperimentRunner(only_modes(EXPERIMENTS[n], modes), scale, data + user, runs,
                                experiment_command(n, scale, data_dir, user, runs, modes), results_file, readme, redo)
               for n in names]  # every config is validated before anything runs
    for runner in runners:
        if estimate:  # (TFLOP/s, TB/s) assumed sustained on the GPU
            print(runner.estimate_text(*estimate) + "\n", flush=True)
            continue
        if dry_run:
            print(runner.plan_text() + "\n")
            continue
        try:
            runner.run()
        except Stopped as stop:
            print(f"[{runner.exp.name}] stopped by a signal after saving a checkpoint; run the same command again "
                  "to continue", flush=True)
            return stop.rc
    return 0
