"""`dynlm <command>`: the one command-line entry point. Nothing imports this module."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .checkpoint import CheckpointError, check_model_matches, load_checkpoint
from .config import ConfigError, check_rule_layers, load_config
from .data.errors import DataError
from .distributed import end_launched_process
from .faults import NumericalFaultError
from .textio import safe_console

PRESETS = Path(__file__).parent / "presets"
SPLITS = ("train", "valid", "test")
BASELINE_MODES = "dyneval,dyneval@lstm,adam,cache"  # the tuned baselines the README compares with `learned`


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help with every option's default, as ArgumentDefaultsHelpFormatter shows it, except
    where there is none worth showing (None, False, []) or the help already says it."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if ("default" in text or default is None or default is False or default == [] or default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


class TopHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The top-level help: its description keeps its paragraphs as written."""


def _q(path) -> str:
    return shlex.quote(str(path))


def _shown(path: Path) -> Path:
    """`path` relative to the current directory when it lies below it (shorter to read and to paste)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(path)


def say_next(*steps: tuple[str, str]) -> None:
    """End a command by naming the natural next one(s): (command, what it does)."""
    for i, (command, why) in enumerate(steps):
        print(f"{'next:' if i == 0 else '  or:'} {command}" + (f"    # {why}" if why else ""))


def _common(p: argparse.ArgumentParser, out_default: str | None = None, protocol: bool = False,
            out_help: str = "run directory (sets log.out_dir)") -> None:
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="experiment file(s) of overrides, applied in order")
    if protocol:
        p.add_argument("--protocol", choices=("article", "krause"),
                       help="evaluation protocol preset, applied before --config files: article (each article from "
                            "theta0, 16 streams, segments of 20) or krause (one stream through the split, never "
                            "reset, segments of 5; Krause et al.) (default: the eval.* settings of the config)")
    p.add_argument("--out", default=out_default, metavar="DIR", help=out_help)
    p.epilog = ("Any config value can be overridden with --section.key=value or --section.key value, e.g. "
                "--train.lr=1e-3; a list is written [100,150]. `dynlm config` lists every key with its default and "
                "meaning.")


def _is_override(arg: str) -> bool:
    """--section.key or --section.key=value: no option of dynlm's own has a dot in its name."""
    return arg.startswith("--") and "." in arg.partition("=")[0]


def join_overrides(argv: list[str]) -> list[str]:
    """Overrides in both usual forms: `--data.source text` becomes `--data.source=text` (the word after a
    dotted flag is its value, unless it is another --flag); everything else is left as it is."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if _is_override(arg) and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
        else:
            out.append(arg)
            i += 1
    return out


def check_overrides(extra: list[str]) -> None:
    bad = [e for e in extra if not (_is_override(e) and "=" in e)]
    if bad:
        raise ConfigError(f"unrecognised argument(s) {' '.join(bad)}; overrides look like --section.key=value "
                          f"or --section.key value")


def _config(args, extra: list[str], base: dict | None = None, presets: list[Path] = (), base_name: str = ""):
    check_overrides(extra)
    overrides = list(extra) + ([f"log.out_dir={args.out}"] if args.out is not None else [])  # taken literally
    if getattr(args, "protocol", None):
        from .modes import protocol_preset
        presets = [*presets, protocol_preset(args.protocol)]
    return load_config([*presets, *args.config], overrides, base=base, base_name=base_name or "the base config")


def cmd_train(args, extra):
    from .checkpoint import check_run_dir
    from .train.static import train_static
    cfg = _config(args, extra)
    check_run_dir(Path(cfg.log.out_dir), "static", "train", args.resume, args.overwrite)
    result = train_static(cfg, Path(cfg.log.out_dir), resume=args.resume)
    if result["is_main"]:
        loss = f"; last train loss {result['train_loss']:.3f}" if result.get("train_loss") is not None else ""
        print(f"best valid ppl {result['best_valid_ppl']:.2f} after {result['steps']} steps "
              f"({result['minutes']:.1f} min){loss}; checkpoint {result['checkpoint']}")
        if not result.get("stopped_by"):
            ckpt = _q(result["checkpoint"])
            say_next((f"dynlm metatrain --init {ckpt}", "meta-train the learned rule on this model"),
                     (f"dynlm tune --checkpoint {ckpt} --modes {BASELINE_MODES}", "or tune the baselines on it"))
    return _signal_exit_code(result)


def cmd_metatrain(args, extra):
    from .train.meta import metatrain
    from .checkpoint import check_run_dir
    from .evaluate import run_dir_of
    init = load_checkpoint(args.init) if args.init else None
    base = init["config"] if init else None
    if args.init and not args.out:  # its own directory beside the static run, never the static run's own
        init_dir = run_dir_of(Path(args.init))
        args.out = str(init_dir.parent / f"{init_dir.name}_meta")
        print(f"metatrain: writing to {args.out} (--out to choose)")
    cfg = _config(args, extra, base=base, base_name=f"the config saved in {args.init}")
    if init:
        _check_against(init, cfg, args.init)
    check_run_dir(Path(cfg.log.out_dir), "meta", "metatrain", args.resume, args.overwrite)
    result = metatrain(cfg, Path(cfg.log.out_dir), init=Path(args.init) if args.init else None, resume=args.resume)
    valid = (f"; validation ppl static {result['meta/valid_ppl_static']:.2f} -> learned "
             f"{result['meta/valid_ppl_learned']:.2f}" if "meta/valid_ppl_learned" in result else "")
    print(f"meta-trained {result['steps']} steps ({result['minutes']:.1f} min){valid}; checkpoint {result['checkpoint']}")
    if not result.get("stopped_by"):
        ckpt, protocol = _q(result["checkpoint"]), f" --protocol {args.protocol}" if args.protocol else ""
        say_next((f"dynlm tune --checkpoint {ckpt}{protocol} --skip-articles 20 --modes "
                  f"{BASELINE_MODES},learned+cache", "tune the baselines on validation text after the 20 articles "
                                                     "evaluate scores"),
                 (f"dynlm evaluate --checkpoint {ckpt}{protocol} --eval.max_articles=20 --modes "
                  f"static,learned,{BASELINE_MODES},learned+cache", "then score every mode on those 20 articles"))
    return _signal_exit_code(result)


def _check_against(ck: dict, cfg, path) -> None:
    """Settings that contradict the loaded checkpoint's model: one error line before any work."""
    check_model_matches(ck, cfg, path)
    check_rule_layers(cfg)


def _signal_exit_code(result: dict) -> int:
    """SIGINT/SIGTERM stopped the run (checkpoint saved): 128 + signal number, as a shell reports it."""
    from .signals import signal_exit_code
    return signal_exit_code(result["stopped_by"]) if result.get("stopped_by") else 0


def cmd_evaluate(args, extra):
    from .evaluate import evaluate_checkpoint
    from .tune import explicit_rule_keys, tuned_in_effect, tuned_path
    ck = load_checkpoint(args.checkpoint)
    cfg = _config(args, extra, base=ck["config"], base_name=f"the config saved in {args.checkpoint}")
    _check_against(ck, cfg, args.checkpoint)  # before anything is printed or scored
    tuned = tuned_path(Path(args.checkpoint), cfg)  # this protocol's tuned values
    use_tuned = tuned.exists() and not args.ignore_tuned
    out = Path(args.out or Path(cfg.log.out_dir) / f"eval_{args.split}")
    if (out / "summary.json").exists() and not args.overwrite:
        raise ConfigError(f"{out} holds an earlier evaluation (summary.json); --overwrite to replace it, or --out "
                          "another directory")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    # each mode runs with its own values from RUN/tuned.yaml; --rule.x=y and --config files still win
    scored = (0, cfg.eval.max_articles or 10**9) if args.split == "valid" else None
    info = (tuned_in_effect(tuned, Path(args.checkpoint), cfg, explicit_rule_keys(args.config, extra), scored)
            if use_tuned else None)
    summary = evaluate_checkpoint(ck, Path(args.checkpoint), cfg, args.split, modes, out, tuned=info)
    if len(summary["modes"]) == 1:  # static alone: nothing compared yet
        say_next((f"dynlm evaluate --checkpoint {_q(args.checkpoint)} --split {args.split} --out {_q(out)} --overwrite "
                  f"--modes static,{BASELINE_MODES}" + (",learned" if "learner" in ck else ""),
                  "compare the dynamic modes with static"))
    else:
        say_next((f"open {_q(out / 'stream.png')} {_q(out / 'heatmap.html')}", "look at where each mode gains"),
                 (f"dynlm report --eval {_q(out)} --report.html_select=gain", "redraw the heat-map on the most "
                                                                              "improved articles"))


def cmd_tune(args, extra):
    from .tune import tune_checkpoint
    ck = load_checkpoint(args.checkpoint)
    cfg = _config(args, extra, base=ck["config"], base_name=f"the config saved in {args.checkpoint}")
    _check_against(ck, cfg, args.checkpoint)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else cfg.tune.modes
    learner = load_checkpoint(args.learner).get("learner") if args.learner else None
    if args.learner and learner is None:
        raise ConfigError(f"--learner {args.learner}: not a meta checkpoint (it holds no learner)")
    skip = cfg.tune.skip_articles if args.skip_articles is None else args.skip_articles
    tune_checkpoint(ck, Path(args.checkpoint), cfg, modes, args.split or cfg.tune.split,
                    cfg.tune.articles if args.articles is None else args.articles, skip, learner_state=learner)
    learned = ",learned" if "learner" in ck else ""
    protocol = f" --protocol {args.protocol}" if args.protocol else ""
    say_next((f"dynlm evaluate --checkpoint {_q(args.checkpoint)}{protocol}"
              + (f" --eval.max_articles={skip}" if skip else "") + f" --modes static{learned},{','.join(modes)}",
              "score every tuned mode" + (f" on the {skip} articles left out of tuning" if skip else "")))


def cmd_report(args, extra):
    from .report import render_report
    cfg = _config(args, extra)
    report = render_report(Path(args.eval), cfg.report)
    print(f"{report.message}:")
    for path in report.files.values():
        print(f"  {path}")
    say_next((f"open {_q(report.files['heatmap'])}", "every token coloured by its improvement (a browser)"))


def cmd_demo(args, extra):
    from .demo import run_demo
    cfg = _config(args, extra, presets=[PRESETS / "demo.yaml"])
    run_demo(cfg, Path(cfg.log.out_dir))
    from .experiments.registry import EXPERIMENTS_DIR
    say_next(("dynlm experiment 2-level --dry-run", "the same pipeline on WikiText-2 (plans it; README: Results)"),
             (f"dynlm train --config {_q(_shown(EXPERIMENTS_DIR / 'wt2_cpu_static.yaml'))} --out runs/wt2",
              "or a static model of your own (docs/usage.md: Score your own text)"))


def cmd_config(args, extra):
    import dataclasses
    from .config import Config
    from .config_doc import render_config
    sections = [f.name for f in dataclasses.fields(Config)]
    unknown = [x for x in args.section or () if x not in sections]
    if unknown:
        raise ConfigError(f"--section {','.join(unknown)}: not a config section; valid: {', '.join(sections)}")
    base = load_checkpoint(args.checkpoint)["config"] if args.checkpoint else None
    cfg = _config(args, extra, base=base, base_name=f"the config saved in {args.checkpoint}" if base else "")
    print("# dynlm config: defaults <- " + ("the checkpoint's config <- " if base else "")
          + "--protocol, --config files <- --section.key=value overrides; a comment names each key's default where "
            "the value differs")
    print(render_config(cfg, args.section))
    print("# next: save this (dynlm config ... > my.yaml), edit it, then `dynlm train --config my.yaml`")


def cmd_experiment(args, extra):
    from .experiments.command import run_experiments
    check_overrides(extra)
    if args.estimate and (args.estimate_tflops <= 0 or args.estimate_bandwidth <= 0):
        raise ConfigError(f"--estimate-tflops and --estimate-bandwidth must be > 0, got {args.estimate_tflops:g} "
                          f"and {args.estimate_bandwidth:g}")
    from .experiments.command import generated_files
    results_file, readme = generated_files(Path(args.runs), args.results_file, args.readme)
    rc = run_experiments(args.name, args.scale, extra, data_dir=args.data_dir, dry_run=args.dry_run,
                         results_only=args.results, runs=Path(args.runs), results_file=results_file, readme=readme,
                         redo=[x.strip() for x in args.redo.split(",") if x.strip()] if args.redo else [],
                         estimate=(args.estimate_tflops, args.estimate_bandwidth) if args.estimate else None,
                         modes=[m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else None)
    if rc == 0 and (args.dry_run or args.estimate):
        say_next((shlex.join(["dynlm", *(a for a in args.argv if a not in ("--dry-run", "--estimate"))]),
                  "run the stages marked 'run' (stages marked 'skip' are reused)"))
    elif rc == 0 and args.name and not args.results:
        evals = sorted(Path(args.runs, "experiments", args.scale).glob(
            f"{'*' if args.name == 'all' else args.name}/*/eval_valid/stream.png"))
        say_next(*((f"open {_q(e)} {_q(e.with_name('heatmap.html'))}", "where each mode gains") for e in evals[:3]),
                 *([(f"less {_q(results_file)}", "the results table")] if results_file else []))
    return rc


def cmd_bench(args, extra):
    from .bench.run import run_bench
    cfg = _config(args, extra + ([f"--bench.device={args.device}"] if args.device else []))
    run_bench(cfg, Path(args.json_out))
    say_next((f"less {_q(args.json_out)}", "every measurement; docs/performance.md explains the ratios"))


def cmd_gpu_check(args, extra):
    from .gpu_check import SHARES, run_gpu_check
    if extra:
        raise ConfigError(f"unrecognised argument(s) {extra}")
    if not 1 <= args.minutes <= 60:
        raise ConfigError(f"--minutes must be in [1, 60], got {args.minutes:g}")
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    unknown = [s for s in only or () if s not in SHARES]
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: unknown stage(s); valid: {', '.join(SHARES)}")
    if args.data_dir and not Path(args.data_dir, "train.txt").is_file():
        raise ConfigError(f"--data-dir {args.data_dir}: no train.txt there (WikiText-2 as train/valid.txt)")
    result = run_gpu_check(args.device, Path(args.out), args.minutes, args.tiny,
                           Path(args.data_dir) if args.data_dir else None, only, Path(args.work) if args.work else None)
    say_next((f"less {_q(Path(args.out) / 'gpu_check.md')}", "what passed, what was measured"))
    return 0 if result["ok"] else 1


class _UsageError(Exception):
    """A command line argparse cannot parse; main() prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line like every other (`dynlm train: error: ...`, exit code 2);
    the usage is one --help away."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


WORKFLOW = """\
Dynamical language models: LMs whose weights keep changing while they read.

Workflow: train -> metatrain -> tune -> evaluate -> report (the commands below, in that order; each
ends by naming the next). First time: `dynlm demo` runs them all on a bundled synthetic corpus in
minutes. `dynlm config` prints every setting with its default and meaning."""


def _add(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog="dynlm", description=WORKFLOW, formatter_class=TopHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = _add(sub, "train", "train the static LSTM LM (the 1-level baseline)")
    _common(p, out_help="run directory (sets log.out_dir; default: log.out_dir, runs/default)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in a run directory that holds checkpoints")
    p.set_defaults(func=cmd_train)

    p = _add(sub, "metatrain", "meta-train the learned rule that rewrites the LSTM weights while reading")
    _common(p, protocol=True, out_help="run directory (sets log.out_dir; default: STATIC_RUN_meta beside the --init "
                                       "run, else log.out_dir)")
    p.add_argument("--init", help="static checkpoint to start from (its config is the base); omit to start from "
                                  "scratch. Without --out the run goes to STATIC_RUN_meta beside the static run")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in a run directory that holds checkpoints")
    p.set_defaults(func=cmd_metatrain)

    p = _add(sub, "tune", "grid-search each mode's values (sgd, dyneval, dyneval@lstm, adam, cache, MODE+cache) on "
                          "validation text the evaluation does not score; saves the best per mode to "
                          "RUN/tuned_PROTOCOL.yaml for `evaluate`")
    _common(p, protocol=True, out_help="not used by tune: it writes beside the checkpoint, RUN/tuned_PROTOCOL.yaml and "
                                       "RUN/tune_PROTOCOL/")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `dynlm train` or `dynlm metatrain` "
                                                       "(learned+cache needs a metatrain one, or --learner)")
    p.add_argument("--modes", help="comma-separated modes to tune, e.g. sgd,dyneval,dyneval@lstm,adam,cache,"
                                   "dyneval+cache (default: tune.modes, sgd,dyneval,cache)")
    p.add_argument("--learner", metavar="CKPT", help="meta checkpoint whose learner `learned+cache` reads (default: "
                                                     "--checkpoint's own, when it is a meta checkpoint)")
    p.add_argument("--articles", type=int, help="tune on N articles of the split; 0 = as many as tune.tokens "
                                                "(30,000) needs (default: tune.articles, 0)")
    p.add_argument("--skip-articles", type=int, metavar="N",
                   help="leave out the split's first N articles, e.g. those an evaluation scores "
                        "(default: tune.skip_articles, 0)")
    p.add_argument("--split", choices=SPLITS, help="split to tune on (default: tune.split, valid)")
    p.set_defaults(func=cmd_tune)

    p = _add(sub, "evaluate", "per-article, per-token evaluation of a checkpoint in every mode; writes "
                              "per_article.csv, summary.json, tokens.parquet and the report")
    _common(p, protocol=True, out_help="where the results go (default: RUN/eval_SPLIT, RUN the checkpoint's run "
                                       "directory as its config records it)")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint written by `dynlm train` (static and the baselines), or by `dynlm metatrain`: "
                        "the learned modes (learned, learned+cache) need a metatrain checkpoint. Tuned values are "
                        "read from its run directory")
    p.add_argument("--split", default="valid", choices=SPLITS,
                   help="train | valid | test; eval.max_articles=N scores only the first N articles")
    p.add_argument("--modes", default="static",
                   help="comma-separated modes RULE[@lstm|@all][+cache], RULE one of static, sgd, dyneval, adam, "
                        "learned; or cache (the static model with the neural cache). E.g. "
                        "static,dyneval,dyneval@lstm,adam,cache,learned,learned+cache")
    p.add_argument("--ignore-tuned", action="store_true",
                   help="do not load RUN/tuned_PROTOCOL.yaml (written by `dynlm tune` for this evaluation protocol), "
                        "which is otherwise used when present")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    p.set_defaults(func=cmd_evaluate)

    p = _add(sub, "report", "plots and an HTML heat-map of per-token loss improvements from `evaluate`'s output "
                            "(evaluate draws them too)")
    p.add_argument("--eval", required=True, metavar="DIR", help="directory written by `dynlm evaluate --out DIR`")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="experiment file(s) of overrides")
    p.set_defaults(func=cmd_report, out=None)
    p.epilog = "Report settings are overridden with --report.key=value, e.g. --report.bin_width=100."

    from .experiments.registry import EXPERIMENTS, SCALES
    p = _add(sub, "experiment", "run one of the paper's experiments end to end (prepare, train, metatrain, tune, "
                                "evaluate, report), reusing every stage already done")
    p.add_argument("name", nargs="?", help=f"{', '.join(EXPERIMENTS)}, or all")
    p.add_argument("--scale", choices=SCALES, default="cpu",
                   help="cpu: WikiText-2, a small model; paper: WikiText-103, AWD-LSTM-sized, GPU")
    p.add_argument("--data-dir", metavar="DIR", help="read WikiText from DIR (wiki.{split}.tokens or {split}.txt) "
                                                     "(default: the scale's source: cpu ../shared/data/wikitext-2, "
                                                     "relative to the current directory; paper the hub)")
    p.add_argument("--dry-run", action="store_true", help="print the stages and what each would do, check that the "
                                                          "data is there; run nothing")
    p.add_argument("--results", action="store_true", help="only regenerate RESULTS.md and README's table from the runs")
    p.add_argument("--estimate", action="store_true",
                   help="print the expected tokens/s and memory of its training stages at their configured sizes, "
                        "extrapolated from short CPU runs of the real-size model; run nothing")
    p.add_argument("--estimate-tflops", type=float, default=100.0, metavar="T",
                   help="sustained matmul throughput assumed for --estimate's tokens/s, in TFLOP/s (about 10%% of an "
                        "H100/H200's dense bf16 peak, typical of LSTMs)")
    p.add_argument("--estimate-bandwidth", type=float, default=3.0, metavar="TB_S",
                   help="sustained memory bandwidth assumed for --estimate's tokens/s, in TB/s (about 60%% of an "
                        "H200's 4.8 TB/s)")
    p.add_argument("--modes", metavar="M1,M2", help="run only these of the experiment's modes (and static), e.g. "
                                                   "the most telling ones first on a slow machine; the results "
                                                   "say which were left out")
    p.add_argument("--redo", metavar="STAGES", help="tune,evaluate: run these again even when done (evaluate then "
                                                    "says whether it reproduced the recorded numbers)")
    p.add_argument("--runs", default="runs", metavar="DIR",
                   help="runs root: stages go under DIR/experiments/SCALE/, reusable runs are looked for in DIR/*")
    p.add_argument("--results-file", metavar="MD",
                   help="write the generated results here ('' = none) (default: the repository's "
                        "experiments/RESULTS.md when run from the repository root with runs inside it, else none)")
    p.add_argument("--readme", metavar="MD",
                   help="README whose generated section is refreshed ('' = none) (default: the repository's "
                        "README.md under the same condition, else none)")
    p.set_defaults(func=cmd_experiment, out=None)
    p.epilog = ("Any config value can be overridden for every stage with --section.key=value (the base model "
                "only sees model/data/train/log overrides), e.g. --eval.max_articles=10 --meta.max_minutes=5.")

    p = _add(sub, "demo", "the whole workflow on the bundled synthetic corpus, minutes on a CPU",
             "The whole workflow on the bundled synthetic corpus, in minutes on a CPU: trains a small static LM, "
             "meta-trains the learned update rule on held-out training articles, tunes every baseline (sgd, "
             "dyneval, adam, cache, learned+cache) on validation articles, then evaluates every mode per article on "
             "the test articles and draws the report. OUT gets static/, meta/ and eval_test/.")
    _common(p, out_default="runs/demo", out_help="where the demo's runs go")
    p.set_defaults(func=cmd_demo)

    p = _add(sub, "config", "print the resolved configuration as YAML: every key with its value, one-line doc and "
                            "default (usable as a --config file)")
    _common(p, protocol=True, out_help="sets log.out_dir in the printed config")
    p.add_argument("--checkpoint", metavar="CKPT", help="start from this checkpoint's saved config, as evaluate, tune "
                                                        "and metatrain --init do")
    p.add_argument("--section", action="append", metavar="NAME",
                   help="print only this section (data, model, train, eval, rule, tune, meta, log, report, bench); "
                        "repeatable")
    p.set_defaults(func=cmd_config)

    p = _add(sub, "bench", "throughput and memory of static training, online evaluation and meta-training, "
                           "as ratios against static training")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="experiment file(s) of overrides")
    p.add_argument("--out", dest="json_out", default="runs/bench.json", metavar="JSON",
                   help="where to write the results")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (sets bench.device; default: bench.device, auto)")
    p.set_defaults(func=cmd_bench, out=None)
    p.epilog = ("Sizes are overridden with --section.key=value, e.g. --bench.batch_size=4 --bench.repeats=5 "
                "--model.hidden_size=512 --bench.threads=1.")

    p = _add(sub, "gpu-check", "prove the CUDA, bf16 and multi-GPU paths in one timed run: GPU tests, bench, "
                               "a reduced paper-scale pipeline; writes gpu_check.json and gpu_check.md")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (the CPU smoke, with --tiny)")
    p.add_argument("--out", default="runs/gpu_check", metavar="DIR", help="report and logs")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget of the whole run; each stage gets a fixed share and is stopped at it")
    p.add_argument("--tiny", action="store_true", help="tiny model, synthetic corpus: the CPU smoke that CI runs")
    p.add_argument("--data-dir", metavar="DIR", help="WikiText-2 as DIR/{train,valid}.txt (default: "
                                                     "../shared/data/wikitext-2)")
    p.add_argument("--only", metavar="STAGES", help="run only these stages: tests,bench,pipeline,multi_gpu")
    p.add_argument("--work", metavar="DIR", help="where the pipeline's runs and checkpoints go (default: OUT/work)")
    p.set_defaults(func=cmd_gpu_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    safe_console()  # LC_ALL=C: a title like Café is printed as Caf\xe9, never a UnicodeEncodeError
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = parser.parse_known_args(join_overrides(args_list))
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    args.argv = args_list  # for the commands that print the next one
    try:
        rc = args.func(args, extra)
        rc = rc if isinstance(rc, int) else 0
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"dynlm {args.command}: error: {e}", file=sys.stderr)
        rc = 2
    except NumericalFaultError as e:  # diverged: not the user's input, so its own exit code
        print(f"dynlm {args.command}: error: {e}", file=sys.stderr)
        rc = 3
    return end_launched_process(rc)  # under torchrun the process ends here (see its docstring)


if __name__ == "__main__":
    sys.exit(main())
