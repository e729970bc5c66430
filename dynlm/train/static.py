"""Pre-training of the static LM (the 1-level baseline) with truncated BPTT over article streams."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, save_rotating, set_rng_state
from ..config import Config, save_config, to_dict
from ..data.streams import StreamLayout
from ..device import autocast, resolve_device
from ..evaluate import perplexity, score
from ..unroll import reset_rows
from ..model import LSTMLM
from ..tracking import Tracker
from .setup import prepare_data


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


def reading_positions(articles, cfg: Config, eos_id: int, epoch: int, chunk_idx: int):
    """(epoch, chunk index, layout) forever, starting from a saved position."""
    while True:
        layout = epoch_layout(articles, cfg, eos_id, epoch)
        for c in range(chunk_idx, len(layout)):
            yield epoch, c, layout
        epoch, chunk_idx = epoch + 1, 0


def train_static(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)
    tok, splits = prepare_data(cfg, run_dir, ["train", "valid"])
    train_arts, valid_arts = splits["train"], splits["valid"]
    lm = LSTMLM(cfg.model, tok.vocab_size)
    params = {k: v.requires_grad_() for k, v in lm.init_params(t.seed, device=device).items()}
    opt = torch.optim.AdamW(params.values(), lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = len(epoch_layout(train_arts, cfg, tok.eos_id, 0))
    total = t.max_steps or steps_per_epoch * t.epochs
    step, epoch, chunk_idx, best, state, minutes_before = 0, 0, 0, float("inf"), None, 0.0
    ckpt_dir = run_dir / "checkpoints"
    if resume and (last := latest_checkpoint(ckpt_dir)) is not None:
        ck = load_checkpoint(last, map_location=device)
        with torch.no_grad():
            for k, v in ck["params"].items():
                params[k].copy_(v)
        opt.load_state_dict(ck["optimizer"])
        step, epoch, chunk_idx, best = ck["step"], ck["epoch"], ck["chunk"], ck["best_valid_ppl"]
        minutes_before = ck["minutes"]
        set_rng_state(ck["rng"])
        state = [(h.to(device), c.to(device)) for h, c in ck["hidden"]] if ck["chunk"] else None
        print(f"resumed from {last} at step {step} (epoch {epoch}, chunk {chunk_idx})")
    save_config(cfg, run_dir / "config.yaml")
    print(f"model: {sum(p.numel() for p in params.values()):,} parameters, vocab {tok.vocab_size}, "
          f"{steps_per_epoch} steps/epoch, {total} steps, device {device}")

    def state_dict(kind: str) -> dict:
        return {"kind": kind, "config": to_dict(cfg), "params": {k: v.detach() for k, v in params.items()},
                "optimizer": opt.state_dict(), "minutes": minutes(), "step": step, "epoch": epoch,
                "chunk": chunk_idx, "best_valid_ppl": best, "rng": rng_state(),
                "hidden": [(h.detach(), c.detach()) for h, c in state],
                "vocab_size": tok.vocab_size, "tokenizer_fingerprint": tok.fingerprint()}

    def validate() -> float:
        s = score(lm, {k: v.detach() for k, v in params.items()}, valid_arts, eos_id=tok.eos_id,
                         segment_length=cfg.eval.segment_length, batch_size=cfg.eval.batch_size,
                         boundary=cfg.eval.boundary, device=device, bf16=t.bf16, desc="valid")
        return perplexity(float(s.nll.sum()), len(s.nll))

    tracker = Tracker(cfg.log, run_dir, to_dict(cfg), job_type="train")
    start = time.perf_counter()

    def minutes() -> float:  # training time, across resumes
        return minutes_before + (time.perf_counter() - start) / 60

    def progress() -> float:
        return max(step / total, minutes() / t.max_minutes if t.max_minutes else 0.0)

    tokens_seen, window_start, window_loss, window_n = 0, time.perf_counter(), 0.0, 0
    bar = tqdm(total=total, initial=step, desc="train", mininterval=2)
    for epoch, chunk_idx, layout in reading_positions(train_arts, cfg, tok.eos_id, epoch, chunk_idx):
        if state is None or chunk_idx == 0:
            state = lm.init_state(layout.n_streams, device=device)
        chunk = layout.chunk(chunk_idx).to(device)
        if t.boundary == "reset":
            state = reset_rows(state, chunk.new_article)
        state = [(h.detach(), c.detach()) for h, c in state]  # truncated BPTT
        with autocast(device, t.bf16):
            out, state = lm.hidden(params, chunk.inputs, state, train=True)
            nll = lm.nll(params, out, chunk.targets)  # (B, T)
        n = int(chunk.mask.sum())
        loss = (nll * chunk.mask).sum() / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), t.clip)
        for group in opt.param_groups:
            group["lr"] = t.lr * lr_factor(t, progress(), step)
        opt.step()
        state = [(h.float(), c.float()) for h, c in state]
        step += 1
        bar.update()
        tokens_seen += n
        window_loss, window_n = window_loss + float(loss.detach()) * n, window_n + n
        if step % t.log_every == 0:
            now = time.perf_counter()
            tracker.log({"train/loss": window_loss / window_n, "train/ppl": math.exp(window_loss / window_n),
                         "train/lr": opt.param_groups[0]["lr"], "train/tokens_per_s": window_n / (now - window_start),
                         "train/epoch": epoch + (chunk_idx + 1) / len(layout)}, step=step, echo=False)
            bar.set_postfix(loss=f"{window_loss / window_n:.3f}")
            window_loss, window_n, window_start = 0.0, 0, now
        # where a resumed run continues reading
        end_of_epoch = chunk_idx + 1 == len(layout)
        epoch, chunk_idx = (epoch + 1, 0) if end_of_epoch else (epoch, chunk_idx + 1)
        done = progress() >= 1.0
        if step % t.eval_every == 0 or end_of_epoch or done:
            ppl = validate()
            tracker.log({"valid/ppl": ppl, "train/minutes": minutes()}, step=step)
            if ppl < best:
                best = ppl
                save_checkpoint(state_dict("static"), ckpt_dir / "best.pt")
            save_rotating(state_dict("static"), ckpt_dir, step)
        if done:
            break
    bar.close()
    result = {"best_valid_ppl": best, "steps": step, "minutes": minutes(),
              "tokens": tokens_seen, "checkpoint": str(ckpt_dir / "best.pt")}
    tracker.summary(result)
    tracker.finish()
    return result
