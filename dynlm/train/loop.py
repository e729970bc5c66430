"""The run scaffolding `dynlm train` and `dynlm metatrain` share; each trainer brings only its step.

A `Run` holds where the run stands (`RunState`), prepares the data (rank 0 first), resumes or
starts, keeps the clock, validates and saves, and calls the callbacks. A trainer (train/static.py,
train/meta.py) builds its model and implements the `Trainer` methods. `Run.loop`, on every rank alike:

    callbacks' on_step_begin
    the trainer's step: read, forward, backward, optimizer step, logs -> (validation due?, save due?)
    agree on the clock and on stop requests: one collective
    done (step or time budget) or a stop requested -> the last step
    validate when due or last (a stop validates only if the trainer says so); save when due, last or improved

Reliability (see README "Reliability"): rotating checkpoints hold the weights, the optimizer, every
RNG (per rank under torchrun), the reading position and the streams' memory, so `--resume` continues
bit-exactly; SIGINT/SIGTERM save and stop after the current step; a non-finite loss or gradient
skips the update (`FaultGuard`).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from .. import distributed as D
from ..checkpoint import (CheckpointError, config_mismatches, load_checkpoint, load_latest_checkpoint,
                          resume_candidates, rng_state, save_checkpoint, save_rotating, set_rng_state)
from ..config import Config, ConfigError, save_config, to_dict
from ..data.streams import StreamLayout
from ..faults import FaultGuard
from ..progress import progress
from ..signals import StopOnSignals
from ..tracking import Tracker
from .setup import prepare_data

COMMAND = {"static": "train", "meta": "metatrain"}  # the command that writes each kind of run
SECTION = {"static": "train", "meta": "meta"}  # its config section (max_bad_steps, keep_checkpoints, ...)
TOKENS_KEY = {"static": "tokens_seen", "meta": "tokens"}  # the checkpoint key of the tokens read, as it always was
RESUMED = {"static": "resumed", "meta": "resumed meta-training"}


@dataclass
class RunState:
    """Where a run stands, apart from weights, optimizer and the streams' memory; in every checkpoint."""
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the reading position a resumed run continues from: epoch and chunk index
    chunk: int = 0
    minutes: float = 0.0  # training time of the processes before this one (a resumed run's)
    tokens: int = 0  # training tokens read, summed over ranks
    best_valid: float = math.inf


class Callback:
    """Hooks into a run, e.g. tests injecting delays, signals and numerical faults."""

    def on_step_begin(self, state: RunState) -> None:
        """Before each step (state.step steps done)."""

    def on_loss(self, state: RunState, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss (scalar, in the graph) before backward; what it returns is back-propagated."""
        return loss


_REGISTERED: list[Callback] = []


@contextlib.contextmanager
def callbacks(*cbs: Callback):
    """`with callbacks(cb, ...):` every run started inside also calls `cbs` (e.g. through the CLI)."""
    _REGISTERED.extend(cbs)
    try:
        yield
    finally:
        for cb in cbs:
            _REGISTERED.remove(cb)


class Trainer(Protocol):
    """What a trainer gives `Run.loop`."""
    validate_on_stop: bool  # a stop request validates before the last save (else it only saves)

    def step(self) -> tuple[bool, bool]:
        """One optimizer step, its logs, run.state moved on; returns (validation due, save due)."""

    def done(self) -> bool:
        """The step or time budget is spent."""

    def validate(self) -> tuple[float, dict] | None:
        """(perplexity to minimise, metrics to log); None on ranks that do not validate."""

    def state_dict(self) -> dict:
        """The trainer's checkpoint entries (weights, optimizer, streams' memory); collective under torchrun."""


def data_signature(articles) -> dict:
    """Enough to notice that the training corpus changed under a run being resumed."""
    return {"n_articles": len(articles), "n_tokens": int(sum(len(a) for a in articles))}


def stream_layout(articles, seed: int, batch: int, length: int, eos_id: int, epoch: int, reset: bool,
                  dinfo: D.DistInfo, key: str) -> StreamLayout:
    """Epoch `epoch`'s reading order (a new shuffle per epoch) as `batch` streams of `length`-token
    chunks, this rank's share of them; key: the config key of `batch`, for the error."""
    order = list(range(len(articles)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    layout = StreamLayout([articles[i] for i in order], batch, length, eos_id, pad_articles=reset)
    if not dinfo.enabled:
        return layout
    if layout.n_streams < dinfo.world_size:
        raise ConfigError(f"{layout.n_streams} article streams ({key}, capped at the number of training "
                          f"articles) cannot be split over {dinfo.world_size} processes; each needs at least one")
    return layout.select_streams(D.shard_slice(layout.n_streams, dinfo.rank, dinfo.world_size))


def reading_positions(layout_of: Callable[[int], StreamLayout], epoch: int, chunk: int) -> Iterator:
    """(epoch, chunk index, this rank's layout) forever, from a saved position; layout_of(epoch)."""
    while True:
        layout = layout_of(epoch)
        for c in range(chunk, len(layout)):
            yield epoch, c, layout
        epoch, chunk = epoch + 1, 0


def check_resumable(ck: dict, path: Path, kind: str, cfg: Config, must_match, may_differ, tok, signature: dict,
                    params: dict, world_size: int) -> None:
    """CheckpointError naming `path` and every mismatch if the checkpoint cannot continue this run.
    A checkpoint without a data signature (meta-training's before it had one) is not checked for it."""
    problems = []
    if ck.get("kind") != kind:
        problems.append(f"it is a {ck.get('kind')!r} checkpoint, not one written by `dynlm {COMMAND[kind]}`")
    problems += config_mismatches(ck.get("config", {}), to_dict(cfg), must_match, ignore=may_differ)
    if ck.get("tokenizer_fingerprint") != tok.fingerprint() or ck.get("vocab_size") != tok.vocab_size:
        problems.append(f"vocabulary mismatch: checkpoint has {ck.get('vocab_size')} types (fingerprint "
                        f"{ck.get('tokenizer_fingerprint')}), the run's tokenizer {tok.vocab_size} ({tok.fingerprint()})")
    if "data_signature" in ck and ck["data_signature"] != signature:
        problems.append(f"training data changed: checkpoint read {ck['data_signature']}, now {signature}")
    if ck.get("world_size", 1) != world_size:
        problems.append(f"written by {ck.get('world_size', 1)} process(es), resumed with {world_size}: resume "
                        "needs the same number (per-rank random streams)")
    saved = ck.get("params", {})
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape) if k in saved else 'absent'}, model {tuple(v.shape)}"
              for k, v in params.items() if k not in saved or saved[k].shape != v.shape]
    if not problems and shapes:  # config mismatches already explain shape differences
        problems += shapes
    if problems:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(problems)
                              + ". Resume with the original settings, or start a fresh --out directory")


class Run:
    """One training run's scaffolding, around a trainer that brings its step (see the module doc).

    kind: "static" or "meta" (the checkpoints' kind; the config section read for max_bad_steps,
    keep_checkpoints, eval_every...). callbacks: besides those registered with `callbacks()`."""

    def __init__(self, cfg: Config, run_dir: Path, kind: str, dinfo: D.DistInfo, device: torch.device,
                 callbacks: tuple[Callback, ...] = ()):
        self.cfg, self.run_dir, self.kind, self.dinfo, self.device = cfg, Path(run_dir), kind, dinfo, device
        self.main = dinfo.is_main
        self.section = getattr(cfg, SECTION[kind])
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = RunState()
        self.guard = FaultGuard(self.section.max_bad_steps, where=SECTION[kind], verbose=self.main)
        self.callbacks = [*_REGISTERED, *callbacks]
        self.tok, self.signature, self.tracker, self.bar = None, None, None, None
        self.valid_metrics: dict = {}  # the last validation's, on the ranks that validate
        self._start, self._agreed = time.perf_counter(), 0.0

    # -- before the loop ------------------------------------------------------------------------
    def prepare_data(self, role: str, before: Callable[[], None] | None = None):
        """(tokenizer, {"train", "valid": articles}). Rank 0 first: it builds the tokenizer and the token
        cache (after `before`), the others then read them, so nothing is written twice. The run
        directory is made only once its data and tokenizer are ready: bad data leaves none."""
        if self.main:
            if before is not None:
                before()
            tok, splits = prepare_data(self.cfg, self.run_dir, ["train", "valid"], role=role)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        if not self.main:
            tok, splits = prepare_data(self.cfg, self.run_dir, ["train", "valid"], role=role)
        self.tok, self.signature = tok, data_signature(splits["train"])
        return tok, splits

    def resume_or_start(self, resume: bool, params: dict, must_match, may_differ) -> dict | None:
        """With `resume`, the newest checkpoint that fits this run (rank 0 picks it, falling back past
        unreadable ones; every rank loads that one): the run state, RNG and fault counts restored
        from it, and it is returned for the trainer's own state. None: a fresh start. params: the
        weights the trainer will restore, {name: tensor} (their shapes are checked)."""
        if not resume:
            if self.main and resume_candidates(self.ckpt_dir):
                warnings.warn(f"{self.ckpt_dir} holds checkpoints of an earlier run; starting from scratch overwrites "
                              "them (pass --resume to continue that run instead)", stacklevel=3)
            return None

        def check(ck, path):
            check_resumable(ck, path, self.kind, self.cfg, must_match, may_differ, self.tok, self.signature, params,
                            self.dinfo.world_size)
        found = load_latest_checkpoint(self.ckpt_dir, map_location=self.device, check=check) if self.main else None
        path = D.broadcast_object(str(found[1]) if found else None)
        if path is None:
            if self.main:
                print(f"--resume: no checkpoint in {self.ckpt_dir}; starting from scratch")
            return None
        ck = found[0] if self.main else load_checkpoint(path, map_location=self.device)
        self._load_state_dict(ck)
        if self.main:
            print(f"{RESUMED[self.kind]} from {path} at step {ck['step']} (epoch {ck['epoch']}, chunk {ck['chunk']})")
        return ck

    def _load_state_dict(self, ck: dict) -> None:
        s = self.state
        s.step, s.epoch, s.chunk, s.minutes = ck["step"], ck["epoch"], ck["chunk"], ck["minutes"]
        s.tokens, s.best_valid = ck.get(TOKENS_KEY[self.kind], 0), ck["best_valid_ppl"]
        self._agreed = s.minutes
        per_rank = ck.get("rng_per_rank")  # under torchrun; meta-training's older checkpoints: rank 0's only
        set_rng_state(per_rank[self.dinfo.rank] if self.dinfo.enabled and per_rank else ck["rng"])
        self.guard.load_state_dict(ck.get("faults", {}))

    def announce(self, line: str) -> None:
        """Rank 0 saves the run's config and prints `line` (what is about to be trained)."""
        if self.main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            print(line)

    # -- the clock and the loop -----------------------------------------------------------------
    def minutes(self) -> float:
        """Training time across resumes; under torchrun the value the ranks last agreed on, so every
        rank takes the same decisions from it."""
        if self.dinfo.enabled:
            return self._agreed
        return self._elapsed()

    def _elapsed(self) -> float:
        return self.state.minutes + (time.perf_counter() - self._start) / 60

    def agree(self, stop: StopOnSignals) -> None:
        """The one collective where the ranks agree, once per step: the clock (the slowest rank's) and
        stop requests (a signal that reached any rank stops them all)."""
        self._agreed, anywhere = D.max_floats([self._elapsed(), float(stop.requested)])
        if anywhere and not stop.requested:
            stop.request()  # another rank got the signal

    def on_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss through the callbacks (before backward)."""
        for cb in self.callbacks:
            loss = cb.on_loss(self.state, loss)
        return loss

    def loop(self, trainer: Trainer, job_type: str, total: int) -> str | None:
        """Step until the trainer is done or a stop is requested; returns the stopping signal's name
        (None when the run ran to its end). job_type: the tracker's; total: steps for the progress bar."""
        self.tracker = Tracker(self.cfg.log, self.run_dir, to_dict(self.cfg), job_type=job_type, enabled=self.main)
        self.bar = progress(total=total, initial=self.state.step, desc=job_type, enabled=self.main)
        self._start = time.perf_counter()
        try:
            if trainer.done():  # e.g. resuming a run that had already finished
                return None
            with StopOnSignals() as stop:
                while True:
                    for cb in self.callbacks:
                        cb.on_step_begin(self.state)
                    validate, save = trainer.step()
                    self.agree(stop)
                    done = trainer.done()
                    stopping = stop.requested and not done  # a run that reached its end finished
                    validate = validate or done or (stopping and trainer.validate_on_stop)
                    self.validate_and_save(trainer, validate, save or done or stopping)
                    if done or stopping:
                        return stop.name if stopping else None
        finally:
            self.bar.close()

    def validate_and_save(self, trainer: Trainer, validate: bool, save: bool) -> None:
        """Validate when asked (best.pt too when the perplexity improved); save when asked or improved.
        Collective under torchrun: every rank calls it with the same arguments."""
        improved = False
        if validate:
            out = trainer.validate()
            if out is not None:
                ppl, metrics = out
                improved = ppl < self.state.best_valid
                self.state.best_valid = min(self.state.best_valid, ppl)
                self.tracker.log(metrics, step=self.state.step)
                self.valid_metrics = metrics
            improved = D.any_true(improved)  # validation may run on rank 0 only
        if save or improved:
            self.save(trainer, best=improved)

    def save(self, trainer: Trainer, best: bool = False) -> None:
        """A rotating checkpoint (and best.pt). Collective under torchrun (gathers per-rank state)."""
        s, tok = self.state, self.tok
        ck = {"kind": self.kind, "config": to_dict(self.cfg), "step": s.step, "epoch": s.epoch, "chunk": s.chunk,
              "minutes": self.minutes(), "best_valid_ppl": s.best_valid, TOKENS_KEY[self.kind]: s.tokens,
              "rng": rng_state(), "faults": self.guard.state_dict(), "world_size": self.dinfo.world_size,
              "vocab_size": tok.vocab_size, "tokenizer_fingerprint": tok.fingerprint(),
              "data_signature": self.signature, **trainer.state_dict()}
        if self.dinfo.enabled:
            ck["rng_per_rank"] = D.gather_objects(rng_state())
        if self.main:
            if best:
                save_checkpoint(ck, self.ckpt_dir / "best.pt")
            save_rotating(ck, self.ckpt_dir, s.step, keep_last=self.section.keep_checkpoints)

    # -- after the loop -------------------------------------------------------------------------
    def finish(self, result: dict) -> dict:
        """Say how to continue a stopped run, record the result, close the tracker; returns `result`."""
        stopped_by = result.get("stopped_by")
        if stopped_by and self.main:
            print(f"{stopped_by}: stopped at step {self.state.step}; checkpoint {self.ckpt_dir / 'last.pt'}; "
                  "continue with --resume", flush=True)
        self.tracker.summary({k: v for k, v in result.items() if k != "is_main"})
        self.tracker.finish(exit_code=1 if stopped_by else 0)
        return result
