"""The tune and evaluate stages of an experiment (and what every stage is): each decides from the records
under RUNS/ whether its result already exists, and runs the command that computes it when not."""
from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import torch

from ..checkpoint import load_checkpoint
from ..config import Config, save_config
from ..evaluate import evaluate_checkpoint
from ..modes import parse_mode, protocol_of
from ..report import render_report
from ..textio import open_csv
from ..tune import tune_checkpoint, tune_order
from ..tuned import article_range, read_tuned, tune_dir, tuned_in_effect, tuned_path
from .configs import RECORD, ArmConfig, _read_json, _write_json, weights_fingerprint
from .registry import SPLIT
from .results import compare_summaries

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



def without(d: dict, *keys: str) -> dict:
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

def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


class TuneStage:
    """The baselines of an experiment grid-searched on the weights they read (`dynlm tune`, one mode at
    a time, each recorded as it finishes), unless a record under the same key says it is done."""

    def __init__(self, runner, arms: list[ArmConfig]):
        self.r, self.ac, self.modes = runner, arms[0], list(runner.exp.tune)
        # learned+cache reads the arm's learner (tuned once, with the first arm's: one arm in practice)
        self.learner = (runner.checkpoint_for(self.ac) if any(parse_mode(m).rule == "learned" for m in self.modes)
                        else None)

    def key(self, target: Path, mode: str) -> dict:
        return self.r.tune_key(target, self.ac.cfg, mode, self.learner if parse_mode(mode).rule == "learned" else None)

    def todo(self) -> tuple[Path, list[str]]:
        """The checkpoint tuned on, and the modes still to tune (parents before their combinations)."""
        cfg = self.ac.cfg
        target = self.r.tune_target(self.ac)
        if not target.is_file():
            return target, self.modes
        records = _read_json(tune_dir(target, cfg) / RECORD) or {}
        tuned = tuned_path(target, cfg)
        have = read_tuned(tuned) if tuned.is_file() else {}

        def parents_now(m) -> dict:  # what a MODE+cache starts from: MODE's and the cache's tuned values
            start = dict(have.get(parse_mode(m).base.name, {}))
            if "cache_theta" in have.get("cache", {}):
                start["cache_theta"] = have["cache"]["cache_theta"]
            return start

        def done(m):  # same key, and tuned.yaml still holds what that tuning found (not edited since)
            r = records.get(m, {})
            ok = r.get("key") == self.key(target, m) and bool(r.get("values")) and have.get(m) == r["values"]
            if ok and parse_mode(m).cache and parse_mode(m).adapts:  # started from its parents' values now?
                ok = all(r["values"].get(k) == v for k, v in parents_now(m).items())
            return ok
        missing = {m for m in self.modes if m in self.r.redo_modes or not done(m)}
        # a MODE+cache starts from MODE's and the cache's tuned values: retuned with them
        missing |= {m for m in self.modes if parse_mode(m).cache and parse_mode(m).adapts
                    and ({parse_mode(m).base.name, "cache"} & missing)}
        return target, [m.name for m in tune_order([parse_mode(m) for m in self.modes if m in missing])]

    def check(self) -> tuple[bool, str]:
        target, missing = self.todo()
        where = f"{tuned_path(target, self.ac.cfg)}"
        if not missing:
            return True, f"done: {where} (tuned on these weights and settings)"
        return False, f"tune {', '.join(missing)} -> {where}"

    def run(self) -> None:
        t = self.ac.cfg.tune
        target, missing = self.todo()
        ck = load_checkpoint(target)
        learner_state = load_checkpoint(self.learner)["learner"] if self.learner is not None else None
        path = tune_dir(target, self.ac.cfg) / RECORD
        for m in missing:  # one mode at a time, each recorded as it finishes: a stopped tuning resumes
            started = time.perf_counter()
            result = tune_checkpoint(ck, target, self.ac.cfg, [m], t.split, t.articles, t.skip_articles,
                                     learner_state=learner_state)
            records = _read_json(path) or {}
            records[m] = {"key": self.key(target, m), "values": result["best"][m], "on_edge": result["on_edge"][m],
                          "tuned_on": {k: result[k] for k in ("split", "skip_articles", "n_articles", "n_tokens",
                                                              "protocol")},
                          "commit": self.r.commit, "command": self.r.command, "finished": now(),
                          "seconds": time.perf_counter() - started}
            _write_json(path, records)

    def stage(self) -> Stage:
        t = self.ac.cfg.tune
        where = (article_range(t.skip_articles, t.articles) if t.articles
                 else f"articles after the first {t.skip_articles} (at least {t.tokens:,} tokens)")
        return Stage("tune", f"{', '.join(self.modes)} on {t.split} {where}, protocol {protocol_of(self.ac.cfg.eval)}",
                     self.check, self.run)


class EvaluationStage:
    """One arm's modes scored per article on the validation split (`dynlm evaluate`), reusing what can be:
    the modes its directory already holds under the same key (`kept`), another experiment's evaluation
    with the same key (`same_elsewhere`, the ablations' shared reference arm), or the same modes inside
    another experiment's larger evaluation of the same base (`superset_elsewhere`, baselines in 2-level)."""

    def __init__(self, runner, ac: ArmConfig):
        self.r, self.ac, self.out = runner, ac, runner.eval_dir(ac)

    def kept(self, ckpt: Path, cfg: Config, tuned: dict | None) -> list[str]:
        """Modes of the evaluation already in the arm's directory that stand as they are: scored on
        these weights, articles and settings, each with the tuned values it would run with now, and
        still modes of the experiment. A run (with `--modes`, or after a mode was added) scores only
        the others and keeps these beside them, instead of scoring every column again."""
        record = _read_json(self.out / RECORD)
        if "evaluate" in self.r.redo or not ckpt.is_file() or not record or not (self.out / "summary.json").is_file():
            return []
        # a record older than the `explicit` key had none: no rule value set explicitly
        old, new = {"explicit": [], **(record.get("key") or {})}, self.r.eval_key(ckpt, cfg, tuned, self.r.all_modes)
        if without(old, "modes", "tuned") != without(new, "modes", "tuned"):
            return []
        return [m for m in old.get("modes", ()) if m in self.r.all_modes
                and old.get("tuned", {}).get(m) == new["tuned"].get(m)]

    def state(self) -> tuple[Path, Config, dict | None, list[str], list[str]]:
        """The checkpoint, config, tuned values, the modes the evaluation will hold (the asked ones and
        those kept, in the experiment's order) and the modes kept."""
        ckpt = self.r.checkpoint_for(self.ac)
        cfg, tuned = self.r.eval_cfg(self.ac)
        keep = self.kept(ckpt, cfg, tuned)
        modes = [m for m in self.r.all_modes if m in self.r.exp.modes or m in keep]
        return ckpt, cfg, tuned, modes, keep

    def others(self) -> list[tuple[Path, dict]]:
        """(directory, recorded key) of every other experiment's finished evaluation."""
        own, found = self.out.resolve(), []
        for record_path in sorted(self.r.root.glob(f"*/*/eval_{SPLIT}/{RECORD}")):
            d = record_path.parent
            if d.resolve() != own and (d / "summary.json").is_file():
                found.append((d, (_read_json(record_path) or {}).get("key") or {}))
        return found

    def same_elsewhere(self, ckpt: Path, cfg: Config, tuned: dict | None) -> Path | None:
        """Another experiment's evaluation with this key (the ablations share their reference arm)."""
        if "evaluate" in self.r.redo or not ckpt.is_file():
            return None
        key = self.r.eval_key(ckpt, cfg, tuned)
        return next((d for d, other in self.others() if other == key), None)

    def superset_elsewhere(self, ckpt: Path, cfg: Config, tuned: dict | None) -> Path | None:
        """Another experiment's evaluation of the same base weights, settings and articles with more
        modes (the baselines inside 2-level): without `learned`, the learner is not read, so this
        evaluation is those modes' results, taken out of it rather than computed again."""
        if "evaluate" in self.r.redo or self.r.learner or not ckpt.is_file():
            return None
        key, modes = self.r.eval_key(ckpt, cfg, tuned), self.r.exp.modes
        settings = without(key, "weights", "modes", "tuned", "explicit")
        base = weights_fingerprint(ckpt, with_learner=False)

        def same_tuned(other: dict) -> bool:  # the modes taken ran with the same tuned values
            return all(other.get("tuned", {}).get(m) == key["tuned"].get(m) for m in modes)
        return next((d for d, other in self.others() if without(other, "weights", "modes", "tuned", "explicit") == settings
                     and same_tuned(other) and set(modes) <= set(other.get("modes", ()))
                     and str(other.get("weights", "")).split("+")[0] == base), None)

    def check(self) -> tuple[bool, str]:
        ckpt, cfg, tuned, modes, keep = self.state()
        if set(self.r.exp.modes) <= set(keep):
            return True, f"done: {self.out} (same weights, modes and settings)"
        other = None if keep else self.same_elsewhere(ckpt, cfg, tuned)
        if other:
            return False, f"copy {other} (same weights, modes and settings) -> {self.out}"
        other = None if keep else self.superset_elsewhere(ckpt, cfg, tuned)
        if other:
            return False, (f"take {', '.join(self.r.exp.modes)} out of {other} (same base weights and settings) "
                           f"-> {self.out}")
        kept_note = f", keeping the scores of {', '.join(keep)} there" if keep else ""
        return False, f"evaluate {', '.join(m for m in modes if m not in keep)} of {ckpt} -> {self.out}{kept_note}"

    def run(self) -> None:
        ckpt, cfg, tuned, modes, keep = self.state()
        other = None if keep else self.same_elsewhere(ckpt, cfg, tuned)
        if other:  # its record (commit, command, time) stays with the copied numbers
            shutil.rmtree(self.out, ignore_errors=True)
            shutil.copytree(other, self.out)
        elif (other := None if keep else self.superset_elsewhere(ckpt, cfg, tuned)):
            take_modes(other, self.out, list(self.r.exp.modes), cfg.report)
            record = _read_json(other / RECORD)
            scored_by = {m: v for m, v in (record.get("scored_by") or {}).items() if m in self.r.exp.modes}
            _write_json(self.out / RECORD, {**record, "key": self.r.eval_key(ckpt, cfg, tuned),
                                            "taken_from": str(other), **({"scored_by": scored_by} if scored_by else {})})
        else:
            self.evaluate(ckpt, cfg, tuned, modes, keep)
        save_config(cfg, self.out.parent / "config.yaml")

    def evaluate(self, ckpt: Path, cfg: Config, tuned: dict | None, modes: list[str], keep: list[str]) -> None:
        """Score the modes not kept (all of them with --redo evaluate, saying whether the recorded numbers
        were reproduced) and record who scored each mode."""
        out, redo = self.out, "evaluate" in self.r.redo
        previous = _read_json(out / "summary.json") if redo else None
        if redo:  # scores kept from an interrupted earlier run are not a reproduction
            shutil.rmtree(out / ".modes", ignore_errors=True)
        old_record = _read_json(out / RECORD) or {}
        scored = (0, cfg.eval.max_articles or 10**9)
        info = (tuned_in_effect(tuned["path"], tuned["target"], cfg, self.r.explicit_rule_keys(self.ac), scored)
                if tuned else None)
        started = time.perf_counter()
        evaluate_checkpoint(load_checkpoint(ckpt), ckpt, cfg, SPLIT, modes, out, tuned=info, keep=keep)
        this = {"commit": self.r.commit, "command": self.r.command, "finished": now()}
        earlier = {k: old_record.get(k) for k in this}
        # who scored each mode: this run, or (kept) the run that scored it before
        scored_by = {m: (old_record.get("scored_by") or {}).get(m, earlier) if m in keep else this for m in modes}
        _write_json(out / RECORD, {"key": self.r.eval_key(ckpt, cfg, tuned, modes), "checkpoint": str(ckpt),
                                   **this, "seconds": time.perf_counter() - started,
                                   "threads": torch.get_num_threads(), "scored_by": scored_by})
        if previous:
            print(compare_summaries(previous, _read_json(out / "summary.json"),
                                    (old_record.get("threads"), torch.get_num_threads())))

    def stage(self) -> Stage:
        e = self.ac.cfg.eval
        articles = f"first {e.max_articles}" if e.max_articles else "all"
        return Stage("evaluate", f"arm {self.ac.arm.name}: {', '.join(self.r.exp.modes)} on {SPLIT} ({articles} "
                                 f"articles, segment length {e.segment_length}, boundary {e.boundary})",
                     self.check, self.run)
