"""Atomic, weights_only-loadable checkpoints with rotation and full RNG capture.

A checkpoint is written to a temp file in the target directory, fsync'ed, then os.replace'd over the
final name, so a crash mid-write never leaves a half-written file under a real checkpoint name.
States hold only tensors, primitives, lists and dicts, so `torch.load(weights_only=True)` works and
loading never executes pickled code.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

LAST = "last.pt"
_ROTATING = re.compile(r"^ckpt_step(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or otherwise unreadable, or does not fit the run."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (unreadable) and an older one used instead."""


def _fsync_dir(directory: Path) -> None:
    try:  # make the rename itself durable; not supported on every platform/filesystem
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(state: dict, path, keep_last: int = 0) -> Path:
    """Atomically write `state` to `path`. keep_last > 0 prunes sibling ckpt_step*.pt files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    if keep_last > 0:
        _prune(path.parent, keep_last)
    return path


def _rotating(directory: Path) -> list[tuple[int, Path]]:
    out = [(int(m.group(1)), p) for p in Path(directory).glob("ckpt_step*.pt")
           if (m := _ROTATING.match(p.name))]
    return sorted(out)


def _prune(directory: Path, keep_last: int) -> None:
    for _, p in _rotating(directory)[:-keep_last]:
        p.unlink(missing_ok=True)


def save_rotating(state: dict, directory, step: int, keep_last: int = 3) -> Path:
    """Write ckpt_step{step:08d}.pt, refresh last.pt, keep only the newest `keep_last` step files."""
    directory = Path(directory)
    path = save_checkpoint(state, directory / f"ckpt_step{step:08d}.pt", keep_last=keep_last)
    # last.pt is a real file (not a symlink) so it survives copying the run dir anywhere
    save_checkpoint(state, directory / LAST)
    return path


def latest_checkpoint(directory) -> Path | None:
    """last.pt if present, else the highest-step ckpt_step*.pt, else None."""
    directory = Path(directory)
    if (directory / LAST).is_file():
        return directory / LAST
    found = _rotating(directory) if directory.is_dir() else []
    return found[-1][1] if found else None


def resume_candidates(directory) -> list[Path]:
    """Checkpoints to resume from, newest first: ckpt_step*.pt by step, then last.pt.
    (save_rotating writes the step file before last.pt, so last.pt is never newer.)"""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for _, p in reversed(_rotating(directory))]
    return found + ([directory / LAST] if (directory / LAST).is_file() else [])


def load_latest_checkpoint(directory, map_location="cpu", check=None) -> tuple[dict, Path] | None:
    """The newest readable checkpoint in `directory` as (state, path); None if there is none.

    Policy: an unreadable (truncated/corrupted) file is left in place for inspection, a
    CheckpointWarning names it, and the next older checkpoint is tried; if none can be read,
    CheckpointError lists them all. `check(state, path)` may raise CheckpointError for a readable
    checkpoint that does not fit this run (other config/vocabulary): that is a user error, so it
    is raised at once rather than hidden by falling back."""
    skipped = []
    for path in resume_candidates(directory):
        try:
            state = load_checkpoint(path, map_location=map_location)
        except CheckpointError as e:
            warnings.warn(f"{e}; trying the previous checkpoint", CheckpointWarning, stacklevel=2)
            skipped.append(path.name)
            continue
        if check is not None:
            check(state, path)
        if skipped:
            warnings.warn(f"resuming from {path} (skipped unreadable {', '.join(skipped)})",
                          CheckpointWarning, stacklevel=2)
        return state, path
    if skipped:
        raise CheckpointError(f"no readable checkpoint in {directory}: {', '.join(skipped)} are all "
                              "truncated or corrupted")
    return None


def flatten_config(d: dict, prefix: str = "") -> dict:
    """{'model': {'hidden_size': 24}} -> {'model.hidden_size': 24}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_mismatches(saved: dict, current: dict, keys, ignore=()) -> list[str]:
    """['model.hidden_size: checkpoint 24, now 32', ...] for dotted `keys` (a section name covers
    the whole section) whose values differ between two config dicts; `ignore` exempts keys.
    Keys the checkpoint does not have (options added to the code since) are not compared."""
    flat_saved, flat_now = flatten_config(saved), flatten_config(current)
    selected = [k for k in sorted(flat_saved)
                if any(k == key or k.startswith(key + ".") for key in keys) and k not in ignore]
    return [f"{k}: checkpoint {flat_saved[k]!r}, now {flat_now[k]!r}" if k in flat_now
            else f"{k}: checkpoint {flat_saved[k]!r}, now absent"
            for k in selected if k not in flat_now or flat_saved[k] != flat_now[k]]


def check_model_matches(ck: dict, cfg, path) -> None:
    """Before a loaded checkpoint is used (evaluate, tune, metatrain --init): every model.* setting must be
    the checkpoint's own, since its weights fix the model. One CheckpointError lists each key that differs
    (set by an override or a --config file), rather than a shape error deep inside torch later."""
    from .config import to_dict

    diff = config_mismatches(ck.get("config", {}), to_dict(cfg), ["model"])
    if diff:
        raise CheckpointError(f"{path}: settings contradict the checkpoint's model: {'; '.join(diff)}; its weights "
                              f"fix the model, so drop these model.* overrides (or --config keys)")


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - translate torch/zip/pickle errors into one clear message
        size = path.stat().st_size
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if first.startswith("Weights only load failed"):  # torch's advice to unpickle unsafely does not apply
            first = "not a torch zip checkpoint, or it holds objects other than tensors and plain values"
        first = first.split(". This is an internal miniz error")[0]  # keep the first sentence
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) is truncated or corrupted and cannot be loaded: "
            f"{type(e).__name__}: {first[:300]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(state).__name__}")
    return state


# --- RNG state ------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy and torch (CPU + all CUDA devices) RNG as weights_only-safe values."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.uint32)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(d: dict) -> None:
    py = d["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    n = d["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(d["torch"].cpu())
    if "cuda" in d and torch.cuda.is_available():
        states = d["cuda"][: torch.cuda.device_count()]  # tolerate resuming on fewer GPUs
        for i, s in enumerate(states):
            torch.cuda.set_rng_state(s.cpu(), i)


def check_run_dir(run_dir, kind: str, command: str, resume: bool, overwrite: bool) -> None:
    """Before a run starts writing into `run_dir`: never into another kind of run (a meta-training run
    must not replace a static run's checkpoints), and not over an earlier run of the same kind unless
    asked (--resume continues it, --overwrite starts it over). One-line CheckpointError otherwise."""
    candidates = resume_candidates(Path(run_dir) / "checkpoints")
    if not candidates:
        return
    found = None
    for path in candidates:
        try:
            found = load_checkpoint(path).get("kind")
            break
        except CheckpointError:
            continue  # corrupted: --resume falls back past it, as it always did
    if found is not None and found != kind:
        raise CheckpointError(f"{run_dir} holds a {found} run's checkpoints; `dynlm {command}` writes a {kind} run "
                              f"and would replace them: choose another --out")
    if not resume and not overwrite:
        raise CheckpointError(f"{run_dir} already holds checkpoints of a {kind} run: pass --resume to continue it, "
                              f"--overwrite to start it over, or choose another --out")
