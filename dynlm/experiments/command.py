"""`dynlm experiment`: which experiments to run, with which modes, where their tables go."""
from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from ..config import ConfigError
from .registry import EXPERIMENTS, README_FILE, REPO, RESULTS_FILE, Experiment, get_experiment
from .results import write_results
from .runs import _inside
from .runner import ExperimentRunner
from .stages import Stopped


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
