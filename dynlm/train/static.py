"""Pre-training of the static LM (the 1-level baseline) with truncated BPTT over article streams.

Reliability (see README "Reliability" and train/loop.py, the scaffolding this trainer plugs its step
into): checkpoints every validation, on SIGINT/SIGTERM and at the end, each holding weights,
optimizer, every RNG, the reading position, the hidden state and the logging window, so `--resume`
continues bit-exactly; a non-finite loss/gradient skips the step (`train.max_bad_steps` in a row
stop the run); under torchrun the global batch of `train.batch_size` streams is split across ranks
and gradients are all-reduced.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from .. import distributed as D
from ..config import Config, ConfigError
from ..data.streams import StreamLayout
from ..device import autocast
from ..prequential import perplexity, score
from ..model import LSTMLM
from ..progress import interactive
from ..reader import as_dtype, reset_rows
from .loop import Callback, Run, reading_positions, stream_layout

# A resumed run must read the same data in the same layout with the same model; everything else
# (lr, max_steps, eval_every, logging...) may change between resumes.
RESUME_MUST_MATCH = ("model", "data", "train.batch_size", "train.bptt", "train.boundary", "train.seed")
RESUME_MAY_DIFFER = ("data.cache_dir", "data.path")  # moved corpus: the data signature still checks it


def lr_factor(cfg, progress: float, step: int) -> float:
    """Warmup, then cosine to 5% over `progress` in [0, 1] (steps or time budget, whichever is further)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_layout(articles, cfg: Config, eos_id: int, epoch: int, dinfo: D.DistInfo = D.DistInfo()) -> StreamLayout:
    """Epoch `epoch`'s reading order as train.batch_size streams of train.bptt tokens (this rank's share)."""
    t = cfg.train
    return stream_layout(articles, t.seed, t.batch_size, t.bptt, eos_id, epoch, t.boundary == "reset", dinfo,
                         "train.batch_size")


def check_train_config(cfg: Config) -> None:
    """What no single field's declaration (config/schema.py) can say: a ConfigError before any work."""
    t = cfg.train
    if not (t.max_steps or t.epochs or t.max_minutes):
        raise ConfigError("nothing to train: set train.max_steps, train.epochs or train.max_minutes")
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={cfg.run.device} but CUDA is not available on this machine")


def warn_long_warmup(t, total_steps: int) -> None:
    """A warmup longer than the run keeps the learning rate below train.lr throughout: the model
    stays close to its initialisation (near-uniform predictions) without any error to say why."""
    if t.warmup_steps > total_steps and not t.max_minutes:
        budget = f"train.max_steps={t.max_steps}" if t.max_steps else f"{t.epochs} epoch(s)"
        print(f"warning: train.warmup_steps={t.warmup_steps} is more than the run's {total_steps} steps ({budget}): "
              f"the learning rate never reaches train.lr={t.lr:g}; lower train.warmup_steps", file=sys.stderr)


def train_static(cfg: Config, run_dir: Path, resume: bool = False, callbacks: tuple[Callback, ...] = ()) -> dict:
    """Train; returns a result dict (also on rank != 0). result['stopped_by'] names the signal when
    SIGINT/SIGTERM ended the run early (after saving a checkpoint), else None."""
    check_train_config(cfg)
    with D.session(cfg.run.device) as (dinfo, device):
        return _train(cfg, Path(run_dir), resume, dinfo, device, callbacks)


def _train(cfg: Config, run_dir: Path, resume: bool, dinfo: D.DistInfo, device: torch.device,
           callbacks: tuple[Callback, ...] = ()) -> dict:
    t = cfg.train
    # dropout draws differ per rank (rank 0 keeps the single-process seed); init_params has its own generator
    torch.manual_seed(t.seed + 7919 * dinfo.rank)
    run = Run(cfg, run_dir, "static", dinfo, device, callbacks)
    tok, splits = run.prepare_data("static")
    trainer = StaticTrainer(run, tok.eos_id, tok.vocab_size, splits["train"], splits["valid"])
    ck = run.resume_or_start(resume, trainer.params, RESUME_MUST_MATCH, RESUME_MAY_DIFFER)
    if ck is not None:
        trainer.load_state_dict(ck)
    run.announce(f"model: {sum(p.numel() for p in trainer.params.values()):,} parameters, vocab {tok.vocab_size}, "
                 f"{trainer.steps_per_epoch} steps/epoch, {trainer.total} steps, device {device}"
                 + (f", {dinfo.world_size} processes ({dinfo.backend})" if dinfo.enabled else ""))
    if run.main:
        warn_long_warmup(t, trainer.total)
    stopped_by = run.loop(trainer, "train", trainer.total)
    ckpt_dir = run.ckpt_dir
    return run.finish({"best_valid_ppl": run.state.best_valid, "train_loss": trainer.last_loss, "steps": run.state.step,
                       "minutes": run.minutes(), "tokens": run.state.tokens, "skipped_steps": run.guard.skipped,
                       "checkpoint": str(ckpt_dir / "best.pt"), "stopped_by": stopped_by,
                       "last_checkpoint": str(ckpt_dir / "last.pt"), "is_main": run.main})


class StaticTrainer:
    """The static LM's step (see loop.Trainer): truncated BPTT on the next chunk of every stream,
    AdamW with warmup and a cosine schedule, the loss window for the logs."""
    validate_on_stop = False  # a stop saves where it is; validation stays on its schedule

    def __init__(self, run: Run, eos_id: int, vocab_size: int, train_arts, valid_arts):
        t = run.cfg.train
        self.run, self.t, self.eos_id, self.train_arts = run, t, eos_id, train_arts
        self.lm = LSTMLM(run.cfg.model, vocab_size)
        self.params = {k: v.requires_grad_() for k, v in self.lm.init_params(t.seed, device=run.device).items()}
        self.opt = torch.optim.AdamW(self.params.values(), lr=t.lr, weight_decay=t.weight_decay)
        self.steps_per_epoch = len(epoch_layout(train_arts, run.cfg, eos_id, 0))
        self.total = t.max_steps or self.steps_per_epoch * t.epochs
        self.my_valid = D.shard(valid_arts, run.dinfo.rank, run.dinfo.world_size)
        self.hidden = None  # the streams' LSTM state, [(h, c)] of (B, H); None: no step taken yet
        self.window_loss, self.window_n, self.window_start = 0.0, 0, time.perf_counter()
        self.last_loss, self.positions = None, None

    def load_state_dict(self, ck: dict) -> None:
        """The trainer's part of a checkpoint (loop.Run restores the rest)."""
        with torch.no_grad():
            for k, v in ck["params"].items():
                self.params[k].copy_(v)
        self.opt.load_state_dict(ck["optimizer"])
        self.window_loss, self.window_n = ck.get("window", (0.0, 0))
        if ck["chunk"]:  # mid-epoch: the streams carry their hidden state on
            d = self.run.dinfo
            rows = D.shard_slice(ck["hidden"][0][0].shape[0], d.rank, d.world_size)
            self.hidden = [(h[rows].to(self.run.device), c[rows].to(self.run.device)) for h, c in ck["hidden"]]

    def state_dict(self) -> dict:
        """Weights, optimizer, every stream's hidden state, the logging window (collective under torchrun)."""
        return {"params": {k: v.detach() for k, v in self.params.items()}, "optimizer": self.opt.state_dict(),
                "hidden": self._global_hidden(), "window": (self.window_loss, self.window_n)}

    def _global_hidden(self):
        """Every stream's hidden state in global row order (rank blocks are contiguous)."""
        local = [(h.detach().cpu(), c.detach().cpu()) for h, c in self.hidden or []]
        if not self.run.dinfo.enabled:
            return local
        parts = D.gather_objects(local)
        return [(torch.cat([p[l][0] for p in parts]), torch.cat([p[l][1] for p in parts])) for l in range(len(local))]

    def progress(self) -> float:
        """How far the run is, in [0, 1]: in steps or in time, whichever is further."""
        t = self.t
        return max(self.run.state.step / self.total if self.total else 0.0,
                   self.run.minutes() / t.max_minutes if t.max_minutes else 0.0)

    def done(self) -> bool:
        return self.progress() >= 1.0

    def step(self) -> tuple[bool, bool]:
        """One truncated-BPTT step on the next chunk; returns (validation due, save due): every
        train.eval_every steps and at the end of each epoch, validate and save."""
        run, s = self.run, self.run.state
        if self.positions is None:  # from the (possibly resumed) reading position
            self.positions = reading_positions(
                lambda e: epoch_layout(self.train_arts, run.cfg, self.eos_id, e, run.dinfo), s.epoch, s.chunk)
        epoch, c, layout = next(self.positions)
        if self.hidden is None or c == 0:
            self.hidden = self.lm.init_state(layout.n_streams, device=run.device)
        self._train_on(layout.chunk(c).to(run.device), layout.n_streams)
        s.step += 1
        run.bar.update()
        if s.step % self.t.log_every == 0 or self.done():  # the last step too: a short run still shows its loss
            self._log(epoch + (c + 1) / len(layout))
        end_of_epoch = c + 1 == len(layout)
        s.epoch, s.chunk = (epoch + 1, 0) if end_of_epoch else (epoch, c + 1)  # where a resumed run continues
        due = s.step % self.t.eval_every == 0 or end_of_epoch
        return due, due

    def _train_on(self, chunk, n_streams: int) -> None:
        """Forward and backward over one chunk, the all-reduced gradient, and the update unless it is
        not finite (then a non-finite hidden state restarts too, or it would poison the next chunks)."""
        run, t, lm, params = self.run, self.t, self.lm, self.params
        state = reset_rows(self.hidden, chunk.new_article) if t.boundary == "reset" else self.hidden
        state = [(h.detach(), c.detach()) for h, c in state]  # truncated BPTT
        n_global = D.all_reduce_sum(int(chunk.mask.sum()))  # every rank divides by the global count: exact mean gradient
        with autocast(run.device, run.cfg.run.bf16):
            out, state = lm.hidden(params, chunk.inputs, state, train=True)
            nll = lm.nll(params, out, chunk.targets)  # (B, T)
        loss = run.on_loss((nll * chunk.mask).sum() / max(n_global, 1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        D.all_reduce_grads(params.values())
        loss_global = float(D.all_reduce_sum(loss.detach()))
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), t.clip)
        if run.guard.check(run.state.step + 1, loss=loss_global, grad_norm=grad_norm):
            for group in self.opt.param_groups:
                group["lr"] = t.lr * lr_factor(t, self.progress(), run.state.step)
            self.opt.step()
            self.window_loss, self.window_n = self.window_loss + loss_global * n_global, self.window_n + n_global
            run.state.tokens += n_global
        else:
            self.opt.zero_grad(set_to_none=True)
            if not all(bool(torch.isfinite(h).all() and torch.isfinite(c).all()) for h, c in state):
                state = lm.init_state(n_streams, device=run.device)
        self.hidden = as_dtype(state, next(iter(params.values())).dtype)  # autocast's bf16 back to the weights'

    def _log(self, epoch: float) -> None:
        """The loss, perplexity and throughput since the last log."""
        run, now = self.run, time.perf_counter()
        metrics = {"train/lr": self.opt.param_groups[0]["lr"], "train/skipped_steps": run.guard.skipped,
                   "train/epoch": epoch}
        if self.window_n:
            self.last_loss = self.window_loss / self.window_n
            metrics.update({"train/loss": self.last_loss, "train/ppl": math.exp(self.last_loss),
                            "train/tokens_per_s": self.window_n / (now - self.window_start)})
            run.bar.set_postfix(loss=f"{self.last_loss:.3f}")
        run.tracker.log(metrics, step=run.state.step, echo=not interactive())  # on a terminal the bar shows the loss
        self.window_loss, self.window_n, self.window_start = 0.0, 0, now

    def validate(self) -> tuple[float, dict]:
        """Validation perplexity, each rank scoring its share of the articles (collective)."""
        run, e = self.run, self.run.cfg.eval
        nll_sum, n = 0.0, 0
        if self.my_valid:
            s = score(self.lm, {k: v.detach() for k, v in self.params.items()}, self.my_valid, eos_id=self.eos_id,
                      segment_length=e.segment_length, batch_size=e.batch_size, boundary=e.boundary,
                      device=run.device, bf16=self.run.cfg.run.bf16, desc="valid")
            nll_sum, n = float(s.nll.sum()), len(s.nll)
        ppl = perplexity(D.all_reduce_sum(nll_sum), D.all_reduce_sum(n))
        return ppl, {"valid/ppl": ppl, "train/minutes": run.minutes(), "train/skipped_steps": run.guard.skipped}
