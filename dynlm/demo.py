"""`dynlm demo`: the whole pipeline on the bundled synthetic corpus, in minutes on a CPU."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import load_checkpoint
from .config import Config
from .run_eval import evaluate_checkpoint
from .train.static import train_static


def run_demo(cfg: Config, run_dir: Path) -> dict:
    result = train_static(cfg, run_dir)
    ckpt = Path(result["checkpoint"])
    summary = evaluate_checkpoint(load_checkpoint(ckpt), ckpt, cfg, "test", cfg.eval.modes, run_dir / "eval_test")
    print(f"\ndemo done: static LM valid ppl {result['best_valid_ppl']:.2f}, "
          f"test ppl {summary['modes']['static']['ppl']:.2f}; everything is under {run_dir}")
    return summary
