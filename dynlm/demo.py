"""`dynlm demo`: the whole pipeline on the bundled synthetic corpus, in minutes on a CPU:
train the static LM, meta-train the learned rule on it, tune the baselines on validation
articles, evaluate every mode per article on the test articles, render the report."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import load_checkpoint
from .config import Config
from .modes import parse_mode, tuned_keys
from .evaluate import evaluate_checkpoint
from .train.meta import metatrain
from .train.static import train_static
from .tune import tune_checkpoint
from .tuned import tuned_in_effect, tuned_path


def run_demo(cfg: Config, run_dir: Path) -> dict:
    static = train_static(cfg, run_dir / "static")
    meta = metatrain(cfg, run_dir / "meta", init=Path(static["checkpoint"]))
    ckpt = Path(meta["checkpoint"])  # the learner and the (unchanged, theta0_lr=0) static weights
    ck = load_checkpoint(ckpt)
    tunable = [m for m in cfg.eval.modes if tuned_keys(parse_mode(m))]
    tuned = None
    if tunable:  # every baseline (and the cache on top of the learned rule) gets its best shot, on validation text
        tune_checkpoint(ck, ckpt, cfg, tunable, cfg.tune.split, cfg.tune.articles, cfg.tune.skip_articles)
        tuned = tuned_in_effect(tuned_path(ckpt, cfg), ckpt, cfg)
    summary = evaluate_checkpoint(ck, ckpt, cfg, "test", cfg.eval.modes, run_dir / "eval_test", tuned=tuned)
    modes = summary["modes"]
    print(f"\ndemo done: static LM valid ppl {static['best_valid_ppl']:.2f}; test ppl "
          + ", ".join(f"{m} {s['ppl']:.2f}" for m, s in modes.items())
          + f"; everything is under {run_dir}")
    return summary
