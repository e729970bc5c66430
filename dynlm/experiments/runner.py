"""The stages of one experiment (prepare, train, metatrain, tune, evaluate, report) and `dynlm
experiment`'s entry point."""
from __future__ import annotations

import copy
import dataclasses
import csv
import shlex
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import torch

from ..checkpoint import load_checkpoint
from ..config import Config, ConfigError, save_config, to_dict
from ..data.errors import DataError
from ..data.wikitext import wikitext_files
from ..evaluate import evaluate_checkpoint
from ..gitinfo import git_state
from ..report import render_report
from ..signals import signal_exit_code
from ..textio import open_csv
from ..train.meta import metatrain
from ..train.setup import prepare_data
from ..train.static import train_static
from ..modes import parse_mode, protocol_of
from ..tune import (TUNABLE, article_range, explicit_rule_keys, mode_grids, read_tuned, tune_checkpoint, tune_dir, tune_order,
                   tuned_in_effect, tuned_path)
from .registry import (WORD_VOCAB, CORPUS, EXPERIMENTS, README_FILE, REPO, RESULTS_FILE, SPLIT, Experiment, at_scale, get_experiment)
from .configs import (BASELINE_RULE, RECORD, ArmConfig, _digest, _read_json, _select, _write_json, experiment_configs,
                      meta_key, static_key, weights_fingerprint)
from .results import compare_summaries, write_results
from .runs import FoundRun, _inside, best_or_last, find_run

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
