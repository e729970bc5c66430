"""Finding runs to reuse: a static or meta-training run anywhere under RUNS/ whose saved config
matches what a stage would compute."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from ..checkpoint import latest_checkpoint
from ..config import Config, meta_steps, to_dict
from ..textio import read_text
from .configs import _mismatches

# ---- finding runs to reuse ------------------------------------------------------------------------
@dataclass
class FoundRun:
    run_dir: Path
    finished: bool
    progress: str  # "step 7848, 37.5 min"
    owned: bool  # made by the runner (under RUNS/experiments): it may resume it


def _run_progress(ck: dict, kind: str, cfg: Config) -> tuple[bool, str]:
    """Whether the run in `ck` has reached its budget (steps, epochs or minutes), as its loop decides."""
    step, minutes = ck.get("step") or 0, ck.get("minutes") or 0.0
    text = f"step {step}, {minutes:.1f} min"
    if kind == "static":
        t = cfg.train
        epochs_done = not t.max_steps and t.epochs and (ck.get("epoch") or 0) >= t.epochs  # max_steps wins
        done = (t.max_steps and step >= t.max_steps) or epochs_done or (t.max_minutes and minutes >= t.max_minutes)
    else:
        m, limit = cfg.meta, meta_steps(cfg)
        done = (limit and step >= limit) or (m.max_minutes and minutes >= m.max_minutes)
    return bool(done), text


_INFO: dict[tuple, dict] = {}


def checkpoint_info(path: Path) -> dict:
    """kind, config and progress of a checkpoint, read through mmap (the tensors stay on disk) and
    cached per file version: planning looks at the same checkpoints many times."""
    st = Path(path).stat()
    cache_key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if cache_key not in _INFO:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        _INFO[cache_key] = {k: ck.get(k) for k in ("kind", "config", "step", "minutes", "epoch", "base_checkpoint")}
    return _INFO[cache_key]


def _inside(path: Path, root: Path) -> bool:
    return Path(root).resolve() in Path(path).resolve().parents


def _candidate_dirs(runs: Path, owned: Path, preferred: str) -> list[Path]:
    """Run directories that may hold a reusable run: the files' own log.out_dir first (when it lies
    under RUNS/), then the runner's, then any other directly under RUNS/."""
    seen, out = set(), []
    first = [Path(preferred)] if _inside(preferred, runs) else []
    for d in [*first, *sorted(owned.glob("*")), *sorted(runs.glob("*"))]:
        r = d.resolve()
        if r not in seen and (d / "config.yaml").is_file() and (d / "checkpoints").is_dir():
            seen.add(r)
            out.append(d)
    return out


def find_run(kind: str, cfg: Config, key_fn: Callable[[dict], dict], runs: Path, owned: Path,
             accept: Callable[[dict, Path], str | None] = lambda ck, d: None,
             explain: bool = True) -> tuple[FoundRun | None, list[str]]:
    """The best run of `kind` ('static' | 'meta') whose saved config matches cfg under key_fn:
    a finished one, else an unfinished one the runner owns (to resume). Also returns notes on near
    misses: matching but unfinished runs of others, and (explain) why cfg.log.out_dir does not match."""
    wanted, notes, unfinished = key_fn(to_dict(cfg)), [], None
    for d in _candidate_dirs(runs, owned, cfg.log.out_dir):
        is_owned = _inside(d, owned)
        try:
            saved = yaml.safe_load(read_text(d / "config.yaml")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        diff = _mismatches(key_fn(saved), wanted)
        if diff:
            if explain and d.resolve() == Path(cfg.log.out_dir).resolve():
                notes.append(f"not reusing {d}: {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}")
            continue
        path = latest_checkpoint(d / "checkpoints")
        if path is None:
            continue
        try:
            ck = checkpoint_info(path)
        except Exception as e:  # noqa: BLE001 - an unreadable candidate is just not reused
            notes.append(f"not reusing {d}: {path} cannot be read ({type(e).__name__})")
            continue
        problem = (f"a {ck.get('kind')!r} run" if ck.get("kind") != kind else
                   "; ".join(_mismatches(key_fn(ck.get("config") or {}), wanted)) or accept(ck, d))
        if problem:
            continue
        finished, progress = _run_progress(ck, kind, cfg)
        if finished:
            return FoundRun(d, True, progress, is_owned), notes
        if is_owned and unfinished is None:
            unfinished = FoundRun(d, False, progress, True)
        elif not is_owned:
            notes.append(f"not reusing {d} yet: it matches but has not finished ({progress}); once it has "
                         "(or has been continued with its own command and --resume), it is reused")
    return unfinished, notes


def best_or_last(run_dir: Path) -> Path:
    """The checkpoint later stages read: best.pt (best validation), else the newest."""
    best = run_dir / "checkpoints" / "best.pt"
    return best if best.is_file() else (latest_checkpoint(run_dir / "checkpoints") or best)
