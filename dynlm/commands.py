"""What each `dynlm <command>` does once its arguments are parsed (cli.py parses them): build the
config (presets <- --config files <- --section.key=value overrides), run the job, print the result
and the command that comes next."""
from __future__ import annotations

import shlex
from pathlib import Path

from .checkpoint import check_model_matches, load_checkpoint
from .config import ConfigError, check_rule_layers, load_config

PRESETS = Path(__file__).parent / "presets"
SPLITS = ("train", "valid", "test")
BASELINE_MODES = "dyneval,dyneval@lstm,adam,cache"  # the tuned baselines the README compares with `learned`


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
    from .tuned import explicit_rule_keys, tuned_in_effect, tuned_path
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
