"""Meta-training: unroll K prequential chunk steps of the learned rule, back-propagate the
summed prequential loss into the learner and theta0, truncate, keep reading."""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..config import Config, ConfigError, save_config, to_dict
from ..data.streams import StreamLayout
from ..device import resolve_device
from ..model import LSTMLM
from ..rules import adapted_names, make_rule
from ..tracking import Tracker
from ..unroll import chunk_step, reset_rows, reset_streams, start_reader
from .setup import prepare_data


def chunks_forever(articles, cfg: Config, eos_id: int, epoch: int = 0):
    m = cfg.meta
    while True:
        order = list(range(len(articles)))
        random.Random(m.seed * 1000 + epoch).shuffle(order)
        layout = StreamLayout([articles[i] for i in order], m.batch_size, m.chunk, eos_id,
                              pad_articles=m.boundary == "reset")
        yield from layout
        epoch += 1


def metatrain(cfg: Config, run_dir: Path, init: Path | None = None, resume: bool = False) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    m = cfg.meta
    if m.boundary not in ("reset", "continuous"):
        raise ConfigError(f"meta.boundary must be reset or continuous, got {m.boundary!r}")
    device = resolve_device(cfg.train.device)
    torch.manual_seed(m.seed)
    base = load_checkpoint(init, map_location=device) if init else None
    if base is not None and not (run_dir / "tokenizer").exists():
        shutil.copytree(Path(init).resolve().parent.parent / "tokenizer", run_dir / "tokenizer")
    tok, splits = prepare_data(cfg, run_dir, ["train"])
    if base is not None and tok.fingerprint() != base["tokenizer_fingerprint"]:
        raise CheckpointError(f"{run_dir / 'tokenizer'} does not match the vocabulary of {init}; "
                              "use a fresh --out directory")
    lm = LSTMLM(cfg.model, tok.vocab_size)
    params = base["params"] if base is not None else lm.init_params(cfg.train.seed, device=device)
    names = adapted_names(lm, cfg.rule, "learned", params)
    static = {k: v.detach().to(device) for k, v in params.items() if k not in names}
    theta0 = {k: params[k].detach().clone().to(device).requires_grad_(m.theta0_lr > 0) for k in names}
    rule = make_rule("learned", cfg.rule, names).to(device)
    groups = [{"params": list(rule.parameters()), "lr": m.lr}]
    if m.theta0_lr > 0:
        groups.append({"params": list(theta0.values()), "lr": m.theta0_lr})
    opt = torch.optim.Adam(groups)
    step = 0
    if resume and (last := latest_checkpoint(run_dir / "checkpoints")) is not None:
        ck = load_checkpoint(last, map_location=device)
        rule.load_state_dict(ck["learner"])
        with torch.no_grad():
            for k in names:
                theta0[k].copy_(ck["params"][k])
        opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
        set_rng_state(ck["rng"])
        print(f"resumed meta-training from {last} at step {step}")
    save_config(cfg, run_dir / "config.yaml")
    n_meta = sum(p.numel() for p in rule.parameters())
    print(f"meta-learner ({cfg.rule.learner}): {n_meta} parameters, rewriting {len(names)} tensors "
          f"({sum(theta0[k].numel() for k in names):,} weights) per stream; K={m.unroll}, chunk={m.chunk}, "
          f"{'second' if m.second_order else 'first'}-order, boundary={m.boundary}")

    stream = chunks_forever(splits["train"], cfg, tok.eos_id)
    for _ in range(step * m.unroll):  # resume: skip what was already read
        next(stream)
    first = next(stream)
    B = first.inputs.shape[0]
    reader = start_reader(lm, theta0, rule, names, B, device)
    static_hidden = lm.init_state(B, device=device)
    pending = [first]
    tracker = Tracker(cfg.log, run_dir, to_dict(cfg), job_type="metatrain")
    start, tokens = time.perf_counter(), 0
    window = {"dyn": 0.0, "static": 0.0, "n": 0, "forget": 0.0, "input": 0.0, "k": 0}
    bar = tqdm(total=m.steps, initial=step, desc="metatrain", mininterval=2)
    while step < m.steps:
        dyn_sum, n_sum = 0.0, 0
        for _ in range(m.unroll):
            chunk = (pending.pop() if pending else next(stream)).to(device)
            if m.boundary == "reset":
                reader = reset_streams(reader, theta0, rule, chunk.new_article)
                static_hidden = reset_rows(static_hidden, chunk.new_article)
            nll, reader, stats = chunk_step(lm, {**static, **theta0}, theta0, rule, reader, chunk,
                                            meta=True, second_order=m.second_order)
            with torch.no_grad():  # the static model on the same chunk: the gain we are after
                out, static_hidden = lm.hidden({**static, **theta0}, chunk.inputs, static_hidden)
                window["static"] += float((lm.nll({**static, **theta0}, out, chunk.targets) * chunk.mask).sum())
            n = int(chunk.mask.sum())
            dyn_sum, n_sum = dyn_sum + nll.sum(), n_sum + n
            window["dyn"] += float(nll.detach().sum()); window["n"] += n
            window["forget"] += float(stats["forget"]); window["input"] += float(stats["input"]); window["k"] += 1
        loss = dyn_sum / max(n_sum, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], m.clip)
        opt.step()
        reader = reader.detached()  # truncate: keep reading the same articles
        step += 1
        tokens += n_sum
        bar.update()
        if step % m.log_every == 0 or step == m.steps:
            w = window
            tracker.log({"meta/loss": w["dyn"] / w["n"], "meta/static_loss": w["static"] / w["n"],
                         "meta/gain": (w["static"] - w["dyn"]) / w["n"], "meta/forget_gate": w["forget"] / w["k"],
                         "meta/input_gate": w["input"] / w["k"],
                         "meta/tokens_per_s": tokens / (time.perf_counter() - start)}, step=step, echo=False)
            bar.set_postfix(gain=f"{(w['static'] - w['dyn']) / w['n']:+.4f}")
            window = dict.fromkeys(window, 0.0)
        if m.max_minutes and (time.perf_counter() - start) / 60 > m.max_minutes:
            break
    bar.close()
    ckpt = run_dir / "checkpoints" / "last.pt"
    save_checkpoint({"kind": "meta", "config": to_dict(cfg), "params": {**static, **{k: v.detach() for k, v in theta0.items()}},
                     "learner": rule.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": rng_state(),
                     "vocab_size": tok.vocab_size, "tokenizer_fingerprint": tok.fingerprint()}, ckpt)
    result = {"steps": step, "minutes": (time.perf_counter() - start) / 60, "checkpoint": str(ckpt)}
    tracker.summary(result)
    tracker.finish()
    return result
