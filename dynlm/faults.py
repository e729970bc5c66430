"""Numerical-fault guard: a NaN/inf loss or gradient skips the update instead of poisoning weights.

Call `check` after backward (and after any gradient all-reduce, so every rank decides alike) and
before the optimizer step:

    guard = FaultGuard(max_consecutive=cfg.train.max_bad_steps, where="train")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)  # returns inf/nan if any grad is
    if guard.check(step, loss=loss, grad_norm=grad_norm):
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)  # drop the bad gradient; also reset any poisoned state

`check` returns False for a bad step, counts it (`skipped`, `consecutive`), and raises
NumericalFaultError once `max_consecutive` bad steps follow one another, so a diverged run stops
with a clear message instead of burning compute (the last checkpoint, written before the fault, is
untouched). A good step resets the consecutive count. `state_dict` / `load_state_dict` carry the
counts across a resume.
"""
from __future__ import annotations

import math
import sys

import torch


class NumericalFaultError(RuntimeError):
    """Too many consecutive non-finite losses/gradients: the run has diverged."""


def _as_float(x) -> float:
    if x is None:
        return 0.0
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().cpu())
    return float(x)


class FaultGuard:
    def __init__(self, max_consecutive: int = 5, where: str = "train", verbose: bool = True):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.where = where
        self.verbose = verbose
        self.skipped = 0  # bad steps over the whole run (across resumes)
        self.consecutive = 0
        self.first_bad_step: int | None = None  # first step of the current bad streak

    def check(self, step: int, loss=None, grad_norm=None) -> bool:
        """True: apply the update. False: skip it (counted). Raises after too many in a row."""
        loss_v, norm_v = _as_float(loss), _as_float(grad_norm)
        if math.isfinite(loss_v) and math.isfinite(norm_v):
            self.consecutive, self.first_bad_step = 0, None
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        what = f"loss={loss_v}" if not math.isfinite(loss_v) else f"grad_norm={norm_v}"
        if self.consecutive >= self.max_consecutive:
            raise NumericalFaultError(
                f"{self.where}: {self.consecutive} consecutive non-finite steps (steps "
                f"{self.first_bad_step}..{step}, last {what}); stopping. No update came from a non-finite "
                f"step, and any checkpoint on disk predates them. Try a lower learning rate or clip, "
                f"bf16 off, or a larger {self.where}.max_bad_steps")
        if self.verbose:
            print(f"{self.where} step {step}: non-finite {what}, update skipped "
                  f"({self.consecutive} in a row, {self.skipped} in total, stop at {self.max_consecutive})",
                  file=sys.stderr, flush=True)
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "first_bad_step": self.first_bad_step}

    def load_state_dict(self, d: dict) -> None:
        self.skipped = int(d.get("skipped", 0))
        self.consecutive = int(d.get("consecutive", 0))
        self.first_bad_step = d.get("first_bad_step")
