"""The stages of one experiment (prepare, train, metatrain, tune, evaluate, report) and `dynlm
experiment`'s entry point."""
from __future__ import annotations

import copy
import time
from pathlib import Path


from ..config import Config, ConfigError, meta_steps, to_dict
from ..data.errors import DataError
from ..data.wikitext import wikitext_files
from ..gitinfo import git_state
from ..signals import signal_exit_code
from ..train.meta import metatrain
from ..train.setup import prepare_data
from ..train.static import train_static
from ..modes import parse_mode
from ..tune import mode_grids
from ..tuned import TUNABLE, explicit_rule_keys, read_tuned, tuned_path
from .registry import WORD_VOCAB, CORPUS, EXPERIMENTS, SPLIT, Experiment, at_scale
from .configs import (BASELINE_RULE, RECORD, ArmConfig, _digest, _read_json, _select, _write_json, experiment_configs,
                      meta_key, static_key, weights_fingerprint)
from .results import write_results
from .runs import FoundRun, best_or_last, find_run
from .stages import EvaluationStage, Stage, Stopped, TuneStage, now

# ---- stages ---------------------------------------------------------------------------------------
DIRTY_PATHS = ("dynlm", "experiments/*.yaml", "pyproject.toml")  # what the numbers depend on (not the docs
# and not RESULTS.md, which the runner itself rewrites)


def git_commit() -> str:
    """HEAD of the repository, '+dirty' when its code or experiment files have uncommitted changes."""
    head, dirty = git_state(DIRTY_PATHS)
    return "unknown" if head is None else head[:12] + ("+dirty" if dirty else "")




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
             f"K={m.unroll} x {cfg.eval.segment_length} tokens", "second-order" if m.second_order else "first-order",
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
                                          "run.bf16"), ("data.cache_dir",))
        key = {"weights": weights_fingerprint(ckpt, with_learner=False), "mode": mode, **settings}
        if cfg.tune.grids.get(mode):  # the mode's own grids (only then: older records stay valid; the shared
            key["grids"] = cfg.tune.grids[mode]  # grids it overrides stay in the key too, a retune too many at worst)
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
        settings = _select(to_dict(cfg), ("eval", "rule", "data", "model", "run.bf16"),
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
                                               "command": self.command, "started": now()})
            result = metatrain(_with_out(ac.cfg, run_dir), run_dir, init=base_ckpt, resume=found is not None)
            _stopped(result)

        return Stage("metatrain", f"arm {ac.arm.name}: {describe_learner(ac.cfg)}", check, run,
                     _budget(ac.cfg.meta.max_minutes, meta_steps(ac.cfg)))

    def _tune_groups(self) -> list[list[ArmConfig]]:
        """Arms grouped by the checkpoint their baselines are tuned on (one group in practice)."""
        if not self.exp.tune:
            return []
        groups: dict[str, list[ArmConfig]] = {}
        for ac in self.configs.arms:
            groups.setdefault(str(self.tune_target(ac)), []).append(ac)
        return list(groups.values())

    def _tune_stage(self, arms: list[ArmConfig]) -> Stage:
        return TuneStage(self, arms).stage()

    def _eval_stage(self, ac: ArmConfig) -> Stage:
        return EvaluationStage(self, ac).stage()

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
            "command": self.command, "updated": now(), "commit": self.commit, "modes": present,
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
        from ..cost import format_costs, meta_training_cost, static_training_cost
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
