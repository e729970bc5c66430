"""`dynlm <command>`: the one command-line entry point. Nothing imports this module."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .checkpoint import load_checkpoint
from .config import ConfigError, load_config
from .data.errors import DataError

PRESETS = Path(__file__).parent / "presets"


def _common(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="experiment file(s) of overrides, applied in order")
    p.add_argument("--out", default=out_default, metavar="DIR", help="run directory (sets log.out_dir)")
    p.epilog = "Any config value can be overridden with --section.key=value, e.g. --train.lr=1e-3."


def _config(args, extra: list[str], base: dict | None = None, presets: list[Path] = ()):
    bad = [e for e in extra if not (e.startswith("--") and "=" in e and "." in e.split("=")[0])]
    if bad:
        raise ConfigError(f"unrecognised argument(s) {bad}; overrides look like --section.key=value")
    overrides = list(extra) + ([f"log.out_dir={args.out}"] if args.out else [])
    return load_config([*presets, *args.config], overrides, base=base)


def cmd_train(args, extra):
    from .train.static import train_static
    cfg = _config(args, extra)
    result = train_static(cfg, Path(cfg.log.out_dir), resume=args.resume)
    print(f"best valid ppl {result['best_valid_ppl']:.2f} after {result['steps']} steps "
          f"({result['minutes']:.1f} min); checkpoint {result['checkpoint']}")


def cmd_metatrain(args, extra):
    from .train.meta import metatrain
    base = load_checkpoint(args.init)["config"] if args.init else None
    cfg = _config(args, extra, base=base)
    result = metatrain(cfg, Path(cfg.log.out_dir), init=Path(args.init) if args.init else None, resume=args.resume)
    print(f"meta-trained {result['steps']} steps ({result['minutes']:.1f} min); checkpoint {result['checkpoint']}")


def cmd_evaluate(args, extra):
    from .run_eval import evaluate_checkpoint
    ck = load_checkpoint(args.checkpoint)
    cfg = _config(args, extra, base=ck["config"])
    out = Path(args.out or Path(cfg.log.out_dir) / f"eval_{args.split}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    evaluate_checkpoint(ck, Path(args.checkpoint), cfg, args.split, modes, out)


def cmd_demo(args, extra):
    from .demo import run_demo
    cfg = _config(args, extra, presets=[PRESETS / "demo.yaml"])
    run_demo(cfg, Path(cfg.log.out_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynlm", description="Dynamical language models: LMs whose weights keep changing while they read.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the static LSTM LM (the 1-level baseline)")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("metatrain", help="meta-train the learned rule that rewrites the LSTM weights while reading")
    _common(p)
    p.add_argument("--init", help="static checkpoint to start from (its config is the base); omit to start from scratch")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.set_defaults(func=cmd_metatrain)

    p = sub.add_parser("evaluate", help="per-article, per-token evaluation of a checkpoint")
    _common(p)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `dynlm train`")
    p.add_argument("--split", default="valid", help="train | valid | test")
    p.add_argument("--modes", default="static", help="comma-separated modes: static,sgd,dyneval,learned")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="the main job on the bundled synthetic corpus: train, then evaluate per article")
    _common(p, out_default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        args.func(args, extra)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"dynlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
