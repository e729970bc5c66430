"""Meta-training: unroll K prequential chunk steps of the learned rule, back-propagate the
summed prequential loss into the learner and theta0, truncate, keep reading the same articles.
The unroll itself (and the truncation, which holds back the last chunk's update so the next
meta-step's first chunk still carries a meta-gradient) is `unroll.TruncatedUnroll`.

Reliability as in static training: rotating checkpoints hold the learner, theta0, the static
weights, the optimizer, every RNG, the reading position and each stream's memory (fast weights,
rule state, hidden states, the held-back update), so `--resume` continues bit-exactly; SIGINT/SIGTERM save and stop;
a non-finite meta-loss or meta-gradient skips the step and restarts the streams' memory from
theta0; under torchrun each rank reads its own streams and the meta-gradients are all-reduced.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from .. import distributed as D
from ..checkpoint import (CheckpointError, check_model_matches, config_mismatches, load_checkpoint,
                          load_latest_checkpoint, rng_state, save_checkpoint, save_rotating, set_rng_state)
from ..config import Config, ConfigError, check_rule_layers, save_config, to_dict
from ..data.streams import StreamLayout
from ..data.tokenizers import load_tokenizer
from ..evaluate import perplexity, score
from ..faults import FaultGuard
from ..model import LSTMLM
from ..progress import interactive, progress
from ..rules import adapted_names, compute_grad_rms, learner_parameters, make_rule, with_consolidation
from ..signals import StopOnSignals
from ..tracking import Tracker
from ..unroll import HeldUpdate, Reader, Stepper, TruncatedUnroll, reset_rows
from .setup import prepare_data

RESUME_MUST_MATCH = ("model", "data", "rule.learner", "rule.learner_hidden", "rule.learner_features", "rule.layers",
                     "rule.weights", "meta.batch_size",
                     "meta.chunk", "meta.boundary", "meta.seed")
RESUME_MAY_DIFFER = ("data.cache_dir", "data.path")


def check_meta_config(cfg: Config) -> None:
    """What no single field's declaration (config.py) can say: a ConfigError before any work."""
    check_rule_layers(cfg)
    m = cfg.meta
    if m.ewc_lambda and m.boundary != "continuous":
        raise ConfigError(f"meta.ewc_lambda={m.ewc_lambda:g} weighs a consolidation of continuous reading; it "
                          f"needs meta.boundary=continuous, not {m.boundary}")


def meta_layout(articles, cfg: Config, eos_id: int, epoch: int, dinfo: D.DistInfo) -> StreamLayout:
    """Epoch `epoch`'s reading order, as this rank's share of meta.batch_size streams."""
    m = cfg.meta
    order = list(range(len(articles)))
    random.Random(m.seed * 1000 + epoch).shuffle(order)
    layout = StreamLayout([articles[i] for i in order], m.batch_size, m.chunk, eos_id,
                          pad_articles=m.boundary == "reset")
    if not dinfo.enabled:
        return layout
    if layout.n_streams < dinfo.world_size:
        raise ConfigError(f"{layout.n_streams} streams cannot be split over {dinfo.world_size} processes")
    return layout.select_streams(D.shard_slice(layout.n_streams, dinfo.rank, dinfo.world_size))


def reading_positions(articles, cfg, eos_id, epoch, chunk_idx, dinfo):
    """(epoch, chunk index, layout) forever from a saved position."""
    while True:
        layout = meta_layout(articles, cfg, eos_id, epoch, dinfo)
        for c in range(chunk_idx, len(layout)):
            yield epoch, c, layout
        epoch, chunk_idx = epoch + 1, 0


def ewc_fisher(lm, params, articles, cfg: Config, names, eos_id, device) -> dict:
    """Diagonal empirical Fisher of the per-token loss, in the units of standard EWC (Kirkpatrick et
    al. 2017): F = E[(d loss_token / d theta)^2], estimated from the squared gradient of each training
    segment's mean loss (one stream, meta.chunk tokens), which is about F / meta.chunk when the tokens'
    gradients are independent: F = meta.chunk * E[g_segment^2]."""
    layout = StreamLayout(articles, cfg.meta.batch_size, cfg.meta.chunk, eos_id)
    rms = compute_grad_rms(lm, params, layout, names, cfg.meta.ewc_chunks, device, stat="stream")
    return {k: cfg.meta.chunk * v.pow(2) for k, v in rms.items()}


def consolidation_input(fisher: dict) -> dict:
    """The learner's per-coordinate consolidation feature: F relative to its mean over every adapted
    weight (scale-free, so one learner reads any model's Fisher)."""
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp(min=1e-30)
    return {k: f / mean for k, f in fisher.items()}


def meta_parameters(params, names, rule, m, device):
    """Copies of the static weights and of theta0 (trainable when meta.static_lr / meta.theta0_lr > 0),
    and the outer Adam over them and the learner: (static, theta0, optimizer, trained tensors)."""
    static = {k: v.detach().clone().to(device).requires_grad_(m.static_lr > 0) for k, v in params.items() if k not in names}
    theta0 = {k: params[k].detach().clone().to(device).requires_grad_(m.theta0_lr > 0) for k in names}
    groups = [{"params": list(rule.parameters()), "lr": m.lr}]
    if m.theta0_lr > 0:
        groups.append({"params": list(theta0.values()), "lr": m.theta0_lr})
    if m.static_lr > 0:
        groups.append({"params": list(static.values()), "lr": m.static_lr})
    return static, theta0, torch.optim.Adam(groups), [p for g in groups for p in g["params"]]


def metatrain(cfg: Config, run_dir: Path, init: Path | None = None, resume: bool = False) -> dict:
    """Meta-train the learned rule; returns a result dict (on every rank). result['stopped_by']
    names the signal when SIGINT/SIGTERM ended the run early (after saving a checkpoint)."""
    check_meta_config(cfg)
    with D.session(cfg.train.device) as (dinfo, device):
        return _metatrain(cfg, Path(run_dir), Path(init) if init else None, resume, dinfo, device)


def _metatrain(cfg: Config, run_dir: Path, init: Path | None, resume: bool, dinfo: D.DistInfo, device) -> dict:
    m, main = cfg.meta, dinfo.is_main
    torch.manual_seed(m.seed)
    base = load_checkpoint(init, map_location=device) if init else None
    if base is not None:
        check_model_matches(base, cfg, init)
    if main:
        if base is not None and not (run_dir / "tokenizer").exists():  # the static run's, copied atomically
            load_tokenizer(init.resolve().parent.parent / "tokenizer").save(run_dir / "tokenizer")
        tok, splits = prepare_data(cfg, run_dir, ["train", "valid"], role="meta")
        run_dir.mkdir(parents=True, exist_ok=True)
    D.barrier()
    if not main:
        tok, splits = prepare_data(cfg, run_dir, ["train", "valid"], role="meta")
    if base is not None and tok.fingerprint() != base["tokenizer_fingerprint"]:
        raise CheckpointError(f"{run_dir / 'tokenizer'} does not match the vocabulary of {init}; "
                              "use a fresh --out directory")
    train_arts, valid_arts = splits["train"], splits["valid"]
    lm = LSTMLM(cfg.model, tok.vocab_size)
    params = base["params"] if base is not None else lm.init_params(cfg.train.seed, device=device)
    names = adapted_names(lm, cfg.rule, "learned", params)
    rule = make_rule("learned", cfg.rule, names).to(device)
    static, theta0, opt, trained = meta_parameters(params, names, rule, m, device)
    guard = FaultGuard(m.max_bad_steps, where="meta", verbose=main)
    fisher = ewc_fisher(lm, {**static, **theta0}, train_arts, cfg, names, tok.eos_id, device) if m.ewc_lambda else None
    if fisher is not None:  # the third level, per coordinate: the learner sees how much each weight matters
        rule.consolidation = consolidation_input(fisher)

    step, epoch, chunk_idx, minutes_before, tokens, reader, static_hidden = 0, 0, 0, 0.0, 0, None, None
    best_valid = float("inf")
    ckpt_dir = run_dir / "checkpoints"
    if resume:
        def check(ck, path):
            problems = [] if ck.get("kind") == "meta" else [f"it is a {ck.get('kind')!r} checkpoint, not a meta one"]
            problems += config_mismatches(ck.get("config", {}), to_dict(cfg), RESUME_MUST_MATCH, ignore=RESUME_MAY_DIFFER)
            if ck.get("tokenizer_fingerprint") != tok.fingerprint():
                problems.append("vocabulary mismatch with the run's tokenizer")
            if ck.get("world_size", 1) != dinfo.world_size:
                problems.append(f"written by {ck.get('world_size', 1)} process(es), resumed with {dinfo.world_size}")
            if problems:
                raise CheckpointError(f"cannot resume from {path}: " + "; ".join(problems))
        found = load_latest_checkpoint(ckpt_dir, map_location=device, check=check) if main else None
        path = D.broadcast_object(str(found[1]) if found else None)
        if path is not None:
            ck = found[0] if main else load_checkpoint(path, map_location=device)
            rule.load_state_dict(learner_parameters(ck["learner"]))
            with torch.no_grad():
                for k, v in ck["params"].items():
                    (theta0 if k in theta0 else static)[k].copy_(v)
            opt.load_state_dict(ck["optimizer"])
            step, epoch, chunk_idx, minutes_before = ck["step"], ck["epoch"], ck["chunk"], ck["minutes"]
            tokens, best_valid = ck["tokens"], ck["best_valid_ppl"]
            set_rng_state(ck["rng"])
            guard.load_state_dict(ck["faults"])
            if ck["reader"] is not None:
                rows = D.shard_slice(ck["reader"]["static_hidden"][0][0].shape[0], dinfo.rank, dinfo.world_size)
                r = {kind: _rows(v, rows, device) for kind, v in ck["reader"].items()}
                reader = Reader(r["hidden"], r["fast"], r["rule_state"],
                                HeldUpdate(**r["held"]) if "held" in r else None)  # older checkpoints: none
                static_hidden = r["static_hidden"]
            if main:
                print(f"resumed meta-training from {path} at step {step} (epoch {epoch}, chunk {chunk_idx})")
    if main:
        save_config(cfg, run_dir / "config.yaml")
        print(f"meta-learner ({cfg.rule.learner}, hidden {cfg.rule.learner_hidden}): "
              f"{sum(p.numel() for p in rule.parameters())} parameters, rewriting {len(names)} tensors "
              f"({sum(theta0[k].numel() for k in names):,} weights) per stream; K={m.unroll}, chunk={m.chunk}, "
              f"{'second' if m.second_order else 'first'}-order, boundary={m.boundary}"
              + (", checkpointed" if m.checkpoint else "") + (f", EWC {m.ewc_lambda}" if fisher else ""))

    def minutes() -> float:
        return minutes_before + (time.perf_counter() - start) / 60

    def gathered_reader():
        if reader is None:
            return None
        local = {"hidden": reader.hidden, "fast": reader.fast, "rule_state": reader.rule_state,
                 "static_hidden": static_hidden}
        if reader.held is not None:
            local["held"] = dict(vars(reader.held))  # the held-back update: drift, grads, rule_state, loss, active
        local = _detach_cpu(local)
        return _cat_rows(D.gather_objects(local)) if dinfo.enabled else local

    def save(best: bool = False) -> None:
        ck = {"kind": "meta", "config": to_dict(cfg),
              "params": {**{k: v.detach() for k, v in static.items()}, **{k: v.detach() for k, v in theta0.items()}},
              "learner": with_consolidation(rule.state_dict(), rule.consolidation), "optimizer": opt.state_dict(), "step": step, "epoch": epoch,
              "chunk": chunk_idx, "minutes": minutes(), "tokens": tokens, "best_valid_ppl": best_valid,
              "rng": rng_state(), "faults": guard.state_dict(), "reader": gathered_reader(),
              "world_size": dinfo.world_size, "base_checkpoint": str(init) if init else None,
              "vocab_size": tok.vocab_size, "tokenizer_fingerprint": tok.fingerprint()}
        if main:
            if best:
                save_checkpoint(ck, ckpt_dir / "best.pt")
            save_rotating(ck, ckpt_dir, step, keep_last=m.keep_checkpoints)

    valid_slice = valid_arts[: m.valid_articles] if m.valid_articles else valid_arts
    static_valid_ppl = None

    def validate() -> dict:
        """Prequential ppl of learned vs static on validation articles (rank 0 only; no collectives)."""
        nonlocal static_valid_ppl
        e = cfg.eval
        weights = {**{k: v.detach() for k, v in static.items()}, **{k: v.detach() for k, v in theta0.items()}}
        kw = dict(eos_id=tok.eos_id, segment_length=e.segment_length, batch_size=e.batch_size, boundary=e.boundary,
                  device=device)
        if static_valid_ppl is None or m.theta0_lr > 0 or m.static_lr > 0:
            s = score(lm, weights, valid_slice, desc="valid static", **kw)
            static_valid_ppl = perplexity(float(s.nll.sum()), len(s.nll))
        s = score(lm, weights, valid_slice, rule=rule, names=names, desc="valid learned", **kw)
        learned = perplexity(float(s.nll.sum()), len(s.nll))
        return {"meta/valid_ppl_static": static_valid_ppl, "meta/valid_ppl_learned": learned,
                "meta/valid_rel_change": learned / static_valid_ppl - 1}

    unroll = TruncatedUnroll(Stepper(lm, static, theta0, rule, boundary=m.boundary, meta=True,
                                     second_order=m.second_order, checkpoint=m.checkpoint), m.unroll, fisher=fisher)
    tracker = Tracker(cfg.log, run_dir, to_dict(cfg), job_type="metatrain", enabled=main)
    positions = reading_positions(train_arts, cfg, tok.eos_id, epoch, chunk_idx, dinfo)
    start, window_start, window_tokens = time.perf_counter(), time.perf_counter(), 0
    window = {"dyn": 0.0, "static": 0.0, "n": 0, "forget": 0.0, "input": 0.0, "k": 0}
    bar = progress(total=m.steps, initial=step, desc="metatrain", enabled=main)
    stopped_by, valid = None, {}
    with StopOnSignals() as stop:
        while step < m.steps:
            read = [next(positions) for _ in range(m.unroll)]
            epoch, c, layout = read[-1]
            # a new epoch (chunk 0) reads a new layout: new streams
            meta_step = unroll(reader, [(lay.chunk(i).to(device), i == 0) for _, i, lay in read])
            for r in meta_step.chunks:  # the static model on the same chunks: the gain we are after
                chunk = r.chunk
                if static_hidden is None or r.restarted:
                    static_hidden = lm.init_state(chunk.inputs.shape[0], device=device)
                if m.boundary == "reset":
                    static_hidden = reset_rows(static_hidden, chunk.new_article)
                with torch.no_grad():
                    weights = {**static, **theta0}
                    out, static_hidden = lm.hidden(weights, chunk.inputs, static_hidden)
                    window["static"] += float((lm.nll(weights, out, chunk.targets) * chunk.mask).sum())
                window["dyn"] += float(r.nll.detach().sum()); window["n"] += r.tokens
                window["forget"] += float(r.stats["forget"]); window["input"] += float(r.stats["input"])
                window["k"] += 1
            chunk_idx = c + 1  # where a resumed run continues reading
            n_global = D.all_reduce_sum(meta_step.tokens)  # every rank divides by the global count: exact global mean
            loss = meta_step.nll / max(n_global, 1)
            if fisher is not None:
                # standard EWC: (lambda / 2) sum_i F_i (theta_i - theta0_i)^2 on top of the per-token mean loss,
                # averaged over the streams and the K fast-weight states of the unroll
                loss = loss + 0.5 * m.ewc_lambda * meta_step.penalty / (m.unroll * D.all_reduce_sum(layout.n_streams))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            D.all_reduce_grads(trained)
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, m.clip)
            if guard.check(step, loss=D.all_reduce_sum(loss.detach()), grad_norm=grad_norm):
                opt.step()
                reader = meta_step.reader  # truncated: keep reading the same articles
            else:  # the streams' memory may hold NaNs: restart it from theta0
                opt.zero_grad(set_to_none=True)
                reader = unroll.start(layout.n_streams, device)
            del meta_step  # the graph
            step += 1
            tokens += n_global
            window_tokens += n_global
            bar.update()
            if step % m.log_every == 0 or step == m.steps:
                w, now = window, time.perf_counter()
                gain = (w["static"] - w["dyn"]) / max(w["n"], 1)
                tracker.log({"meta/loss": w["dyn"] / w["n"], "meta/static_loss": w["static"] / w["n"],
                             "meta/gain": gain, "meta/forget_gate": w["forget"] / w["k"],
                             "meta/input_gate": w["input"] / w["k"], "meta/skipped_steps": guard.skipped,
                             "meta/tokens_per_s": window_tokens / (now - window_start),
                             "meta/epoch": epoch + chunk_idx / len(layout)},
                            step=step, echo=not interactive())  # on a terminal the bar shows the gain
                bar.set_postfix(gain=f"{gain:+.4f}")
                window = dict.fromkeys(window, 0.0)
                window_start, window_tokens = now, 0
            out_of_time = bool(m.max_minutes) and D.max_float(minutes()) > m.max_minutes  # total, across resumes
            stop_now = D.any_true(stop.requested)
            last = step >= m.steps or out_of_time or stop_now
            improved = False
            if (m.eval_every and step % m.eval_every == 0) or last:
                if main:
                    valid = validate()
                    improved = valid["meta/valid_ppl_learned"] < best_valid
                    best_valid = min(best_valid, valid["meta/valid_ppl_learned"])
                    tracker.log(valid, step=step)
                improved = D.any_true(improved)
            if improved or step % m.checkpoint_every == 0 or last:
                save(best=improved)
            if stop_now:
                stopped_by = stop.name or "signal"
                if main:
                    print(f"stopped by {stopped_by} at step {step}; resume with --resume")
            if last:
                break
    bar.close()
    ckpt = ckpt_dir / ("best.pt" if (ckpt_dir / "best.pt").exists() else "last.pt")
    result = {"steps": step, "minutes": minutes(), "tokens": tokens, "checkpoint": str(ckpt),
              "skipped_steps": guard.skipped, "stopped_by": stopped_by, **valid}
    tracker.summary(result)
    tracker.finish()
    return result


def _detach_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _detach_cpu(v) for k, v in x.items()}
    return [type(e)(_detach_cpu(t) for t in e) if isinstance(e, tuple) else _detach_cpu(e) for e in x]


def _cat_rows(parts: list):
    """Rank-local reader states -> one in global stream order (rank blocks are contiguous)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.dim() else first
    if isinstance(first, dict):
        return {k: _cat_rows([p[k] for p in parts]) for k in first}
    return [tuple(_cat_rows([p[i][j] for p in parts]) for j in range(len(first[i]))) for i in range(len(first))]


def _rows(x, rows: slice, device):
    """This rank's streams of a saved reader state, on `device`."""
    if isinstance(x, torch.Tensor):
        return x[rows].to(device) if x.dim() else x.to(device)
    if isinstance(x, dict):
        return {k: _rows(v, rows, device) for k, v in x.items()}
    return [tuple(_rows(t, rows, device) for t in e) for e in x]
