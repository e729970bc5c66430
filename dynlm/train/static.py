"""Pre-training of the static LM (the 1-level baseline) with truncated BPTT over article streams.

Reliability (see README "Reliability"): checkpoints every validation, on SIGINT/SIGTERM and at the
end, each holding weights, optimizer, every RNG, the reading position, the hidden state and the
logging window, so `--resume` continues bit-exactly; a non-finite loss/gradient skips the step
(`train.max_bad_steps` in a row stop the run); under torchrun the global batch of
`train.batch_size` streams is split across ranks and gradients are all-reduced.
"""
from __future__ import annotations

import math
import random
import sys
import time
import warnings
from pathlib import Path

import torch

from .. import distributed as D
from ..checkpoint import (CheckpointError, config_mismatches, load_latest_checkpoint, load_checkpoint,
                          resume_candidates, rng_state, save_checkpoint, save_rotating, set_rng_state)
from ..config import Config, ConfigError, save_config, to_dict
from ..data.streams import StreamLayout
from ..device import autocast
from ..evaluate import perplexity, score
from ..faults import FaultGuard
from ..model import LSTMLM
from ..progress import interactive, progress as progress_bar
from ..signals import StopOnSignals
from ..tracking import Tracker
from ..unroll import reset_rows
from .setup import prepare_data

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


def epoch_layout(articles, cfg: Config, eos_id: int, epoch: int) -> StreamLayout:
    order = list(range(len(articles)))
    random.Random(cfg.train.seed * 1000 + epoch).shuffle(order)  # a new reading order per epoch
    return StreamLayout([articles[i] for i in order], cfg.train.batch_size, cfg.train.bptt, eos_id,
                        pad_articles=cfg.train.boundary == "reset")


def rank_layout(layout: StreamLayout, dinfo: D.DistInfo) -> StreamLayout:
    """This rank's streams of the global layout (all of them in a single process)."""
    if not dinfo.enabled:
        return layout
    if layout.n_streams < dinfo.world_size:
        raise ConfigError(f"{layout.n_streams} article streams (train.batch_size, capped at the number of training "
                          f"articles) cannot be split over {dinfo.world_size} processes; each needs at least one")
    return layout.select_streams(D.shard_slice(layout.n_streams, dinfo.rank, dinfo.world_size))


def reading_positions(articles, cfg: Config, eos_id: int, epoch: int, chunk_idx: int, dinfo: D.DistInfo = D.DistInfo()):
    """(epoch, chunk index, this rank's layout) forever, starting from a saved position."""
    while True:
        layout = rank_layout(epoch_layout(articles, cfg, eos_id, epoch), dinfo)
        for c in range(chunk_idx, len(layout)):
            yield epoch, c, layout
        epoch, chunk_idx = epoch + 1, 0


def check_train_config(cfg: Config) -> None:
    """What no single field's declaration (config.py) can say: a ConfigError before any work."""
    t = cfg.train
    if not (t.max_steps or t.epochs or t.max_minutes):
        raise ConfigError("nothing to train: set train.max_steps, train.epochs or train.max_minutes")
    if t.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={t.device} but CUDA is not available on this machine")


def warn_long_warmup(t, total_steps: int) -> None:
    """A warmup longer than the run keeps the learning rate below train.lr throughout: the model
    stays close to its initialisation (near-uniform predictions) without any error to say why."""
    if t.warmup_steps > total_steps and not t.max_minutes:
        budget = f"train.max_steps={t.max_steps}" if t.max_steps else f"{t.epochs} epoch(s)"
        print(f"warning: train.warmup_steps={t.warmup_steps} is more than the run's {total_steps} steps ({budget}): "
              f"the learning rate never reaches train.lr={t.lr:g}; lower train.warmup_steps", file=sys.stderr)


def data_signature(articles) -> dict:
    """Enough to notice that the training corpus changed under a run being resumed."""
    return {"n_articles": len(articles), "n_tokens": int(sum(len(a) for a in articles))}


def check_resumable(ck: dict, path: Path, cfg: Config, tok, train_arts, params: dict, world_size: int) -> None:
    """CheckpointError naming `path` and every mismatch if the checkpoint cannot continue this run."""
    problems = []
    if ck.get("kind") != "static":
        problems.append(f"it is a {ck.get('kind')!r} checkpoint, not one written by `dynlm train`")
    problems += config_mismatches(ck.get("config", {}), to_dict(cfg), RESUME_MUST_MATCH, ignore=RESUME_MAY_DIFFER)
    if ck.get("tokenizer_fingerprint") != tok.fingerprint() or ck.get("vocab_size") != tok.vocab_size:
        problems.append(f"vocabulary mismatch: checkpoint has {ck.get('vocab_size')} types (fingerprint "
                        f"{ck.get('tokenizer_fingerprint')}), the run's tokenizer {tok.vocab_size} ({tok.fingerprint()})")
    if "data_signature" in ck and ck["data_signature"] != data_signature(train_arts):
        problems.append(f"training data changed: checkpoint read {ck['data_signature']}, now {data_signature(train_arts)}")
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


def train_static(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """Train; returns a result dict (also on rank != 0). result['stopped_by'] names the signal when
    SIGINT/SIGTERM ended the run early (after saving a checkpoint), else None."""
    check_train_config(cfg)
    with D.session(cfg.train.device) as (dinfo, device):
        return _train(cfg, Path(run_dir), resume, dinfo, device)


def _train(cfg: Config, run_dir: Path, resume: bool, dinfo: D.DistInfo, device: torch.device) -> dict:
    t = cfg.train
    main = dinfo.is_main
    # dropout draws differ per rank (rank 0 keeps the single-process seed); init_params has its own generator
    torch.manual_seed(t.seed + 7919 * dinfo.rank)
    # rank 0 builds the tokenizer and the token cache; the others then read them (no write races)
    if main:  # the run directory is made only once its data and tokenizer are ready: bad data leaves none
        tok, splits = prepare_data(cfg, run_dir, ["train", "valid"], role="static")
        run_dir.mkdir(parents=True, exist_ok=True)
    D.barrier()
    if not main:
        tok, splits = prepare_data(cfg, run_dir, ["train", "valid"], role="static")
    train_arts, valid_arts = splits["train"], splits["valid"]
    lm = LSTMLM(cfg.model, tok.vocab_size)
    params = {k: v.requires_grad_() for k, v in lm.init_params(t.seed, device=device).items()}
    opt = torch.optim.AdamW(params.values(), lr=t.lr, weight_decay=t.weight_decay)
    guard = FaultGuard(t.max_bad_steps, where="train", verbose=main)
    steps_per_epoch = len(epoch_layout(train_arts, cfg, tok.eos_id, 0))
    total = t.max_steps or steps_per_epoch * t.epochs
    step, epoch, chunk_idx, best, state, minutes_before = 0, 0, 0, float("inf"), None, 0.0
    tokens_seen, window_loss, window_n = 0, 0.0, 0
    ckpt_dir = run_dir / "checkpoints"
    if resume:
        def check(ck, path):
            check_resumable(ck, path, cfg, tok, train_arts, params, dinfo.world_size)
        # rank 0 picks the checkpoint (falling back past unreadable ones), every rank loads that one
        found = load_latest_checkpoint(ckpt_dir, map_location=device, check=check) if main else None
        path = D.broadcast_object(str(found[1]) if found else None)
        if path is not None:
            ck = found[0] if main else load_checkpoint(path, map_location=device)
            with torch.no_grad():
                for k, v in ck["params"].items():
                    params[k].copy_(v)
            opt.load_state_dict(ck["optimizer"])
            step, epoch, chunk_idx, best = ck["step"], ck["epoch"], ck["chunk"], ck["best_valid_ppl"]
            minutes_before = ck["minutes"]
            set_rng_state(ck["rng_per_rank"][dinfo.rank] if dinfo.enabled else ck["rng"])
            guard.load_state_dict(ck.get("faults", {}))
            tokens_seen = ck.get("tokens_seen", 0)
            window_loss, window_n = ck.get("window", (0.0, 0))
            if ck["chunk"]:  # mid-epoch: the streams carry their hidden state on
                rows = D.shard_slice(ck["hidden"][0][0].shape[0], dinfo.rank, dinfo.world_size)
                state = [(h[rows].to(device), c[rows].to(device)) for h, c in ck["hidden"]]
            if main:
                print(f"resumed from {path} at step {step} (epoch {epoch}, chunk {chunk_idx})")
        elif main:
            print(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
    elif main and resume_candidates(ckpt_dir):
        warnings.warn(f"{ckpt_dir} holds checkpoints of an earlier run; starting from scratch overwrites them "
                      "(pass --resume to continue that run instead)", stacklevel=2)
    if main:
        save_config(cfg, run_dir / "config.yaml")
        print(f"model: {sum(p.numel() for p in params.values()):,} parameters, vocab {tok.vocab_size}, "
              f"{steps_per_epoch} steps/epoch, {total} steps, device {device}"
              + (f", {dinfo.world_size} processes ({dinfo.backend})" if dinfo.enabled else ""))
        warn_long_warmup(t, total)

    def global_hidden():
        """Every stream's hidden state in global row order (rank blocks are contiguous)."""
        local = [(h.detach().cpu(), c.detach().cpu()) for h, c in state or []]  # None: no step taken yet
        if not dinfo.enabled:
            return local
        parts = D.gather_objects(local)
        return [(torch.cat([p[l][0] for p in parts]), torch.cat([p[l][1] for p in parts])) for l in range(len(local))]

    def checkpoint_state() -> dict:
        """Collective under torchrun (gathers hidden state and RNG): call on every rank."""
        ck = {"kind": "static", "config": to_dict(cfg), "params": {k: v.detach() for k, v in params.items()},
              "optimizer": opt.state_dict(), "minutes": minutes(), "step": step, "epoch": epoch,
              "chunk": chunk_idx, "best_valid_ppl": best, "rng": rng_state(), "hidden": global_hidden(),
              "vocab_size": tok.vocab_size, "tokenizer_fingerprint": tok.fingerprint(),
              "data_signature": data_signature(train_arts), "world_size": dinfo.world_size,
              "faults": guard.state_dict(), "tokens_seen": tokens_seen, "window": (window_loss, window_n)}
        if dinfo.enabled:
            ck["rng_per_rank"] = D.gather_objects(rng_state())
        return ck

    def save(best_too: bool = False) -> None:
        ck = checkpoint_state()
        if main:
            if best_too:
                save_checkpoint(ck, ckpt_dir / "best.pt")
            save_rotating(ck, ckpt_dir, step, keep_last=t.keep_checkpoints)

    my_valid = D.shard(valid_arts, dinfo.rank, dinfo.world_size)

    def validate() -> float:
        nll_sum, n = 0.0, 0
        if my_valid:
            s = score(lm, {k: v.detach() for k, v in params.items()}, my_valid, eos_id=tok.eos_id,
                      segment_length=cfg.eval.segment_length, batch_size=cfg.eval.batch_size,
                      boundary=cfg.eval.boundary, device=device, bf16=t.bf16, desc="valid")
            nll_sum, n = float(s.nll.sum()), len(s.nll)
        return perplexity(D.all_reduce_sum(nll_sum), D.all_reduce_sum(n))

    tracker = Tracker(cfg.log, run_dir, to_dict(cfg), job_type="train", enabled=main)
    start = time.perf_counter()
    agreed_minutes = minutes_before  # under torchrun: rank-0-independent, agreed once per step

    def minutes() -> float:  # training time, across resumes
        if dinfo.enabled:
            return agreed_minutes
        return minutes_before + (time.perf_counter() - start) / 60

    def progress() -> float:
        return max(step / total if total else 0.0, minutes() / t.max_minutes if t.max_minutes else 0.0)

    window_start = time.perf_counter()
    stopped_by, last_loss = None, None
    saved_at = step if resume and step else None  # the step whose checkpoint is on disk
    bar = progress_bar(total=total, initial=step, desc="train", enabled=main)
    with StopOnSignals() as stop:
        positions = reading_positions(train_arts, cfg, tok.eos_id, epoch, chunk_idx, dinfo)
        finished = progress() >= 1.0  # e.g. resuming a run that had already finished
        while not finished:
            # one place per step where all ranks agree: stop requests and the clock
            if dinfo.enabled:
                agreed_minutes, stop_anywhere = D.max_floats(
                    [minutes_before + (time.perf_counter() - start) / 60, float(stop.requested)])
                if stop_anywhere and not stop.requested:
                    stop.request()  # another rank got the signal
            if stop.requested:
                if saved_at != step:
                    save()
                stopped_by = stop.name
                break
            epoch, chunk_idx, layout = next(positions)
            if state is None or chunk_idx == 0:
                state = lm.init_state(layout.n_streams, device=device)
            chunk = layout.chunk(chunk_idx).to(device)
            if t.boundary == "reset":
                state = reset_rows(state, chunk.new_article)
            state = [(h.detach(), c.detach()) for h, c in state]  # truncated BPTT
            n = int(chunk.mask.sum())
            n_global = D.all_reduce_sum(n)  # every rank divides by the global count: exact mean gradient
            with autocast(device, t.bf16):
                out, state = lm.hidden(params, chunk.inputs, state, train=True)
                nll = lm.nll(params, out, chunk.targets)  # (B, T)
            loss = (nll * chunk.mask).sum() / max(n_global, 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            D.all_reduce_grads(params.values())
            loss_global = float(D.all_reduce_sum(loss.detach()))
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), t.clip)
            if guard.check(step + 1, loss=loss_global, grad_norm=grad_norm):
                for group in opt.param_groups:
                    group["lr"] = t.lr * lr_factor(t, progress(), step)
                opt.step()
                window_loss, window_n = window_loss + loss_global * n_global, window_n + n_global
                tokens_seen += n_global
            else:  # skip the update; a non-finite hidden state would poison the next chunks too
                opt.zero_grad(set_to_none=True)
                if not all(bool(torch.isfinite(h).all() and torch.isfinite(c).all()) for h, c in state):
                    state = lm.init_state(layout.n_streams, device=device)
            state = [(h.float(), c.float()) for h, c in state]
            step += 1
            bar.update()
            done = progress() >= 1.0
            if step % t.log_every == 0 or done:  # the last step too: a short run still shows its loss
                now = time.perf_counter()
                metrics = {"train/lr": opt.param_groups[0]["lr"], "train/skipped_steps": guard.skipped,
                           "train/epoch": epoch + (chunk_idx + 1) / len(layout)}
                if window_n:
                    last_loss = window_loss / window_n
                    metrics.update({"train/loss": window_loss / window_n, "train/ppl": math.exp(window_loss / window_n),
                                    "train/tokens_per_s": window_n / (now - window_start)})
                    bar.set_postfix(loss=f"{window_loss / window_n:.3f}")
                tracker.log(metrics, step=step, echo=not interactive())  # on a terminal the bar shows the loss
                window_loss, window_n, window_start = 0.0, 0, now
            # where a resumed run continues reading
            end_of_epoch = chunk_idx + 1 == len(layout)
            epoch, chunk_idx = (epoch + 1, 0) if end_of_epoch else (epoch, chunk_idx + 1)
            if step % t.eval_every == 0 or end_of_epoch or done:
                ppl = validate()
                tracker.log({"valid/ppl": ppl, "train/minutes": minutes(), "train/skipped_steps": guard.skipped},
                            step=step)
                improved = ppl < best
                if improved:
                    best = ppl
                save(best_too=improved)
                saved_at = step
            finished = done
    bar.close()
    result = {"best_valid_ppl": best, "train_loss": last_loss, "steps": step, "minutes": minutes(), "tokens": tokens_seen,
              "skipped_steps": guard.skipped, "checkpoint": str(ckpt_dir / "best.pt"), "stopped_by": stopped_by,
              "last_checkpoint": str(ckpt_dir / "last.pt"), "is_main": main}
    if stopped_by and main:
        print(f"{stopped_by}: stopped at step {step}; checkpoint {ckpt_dir / 'last.pt'}; continue with --resume",
              flush=True)
    tracker.summary({k: v for k, v in result.items() if k != "is_main"})
    tracker.finish(exit_code=1 if stopped_by else 0)
    return result
