"""`dynlm <command>`: the one command-line entry point: the parser and `main`; commands.py runs each command."""
from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .commands import (SPLITS, cmd_bench, cmd_config, cmd_demo, cmd_evaluate, cmd_experiment, cmd_gpu_check,
                       cmd_metatrain, cmd_report, cmd_train, cmd_tune, join_overrides)
from .config import ConfigError
from .data.errors import DataError
from .distributed import end_launched_process
from .faults import NumericalFaultError
from .textio import safe_console


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
