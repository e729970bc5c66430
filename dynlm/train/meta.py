"""Meta-training: unroll K prequential chunk steps of the learned rule, back-propagate the
summed prequential loss into the learner and theta0, truncate, keep reading the same articles.
The unroll itself (and the truncation, which holds back the last chunk's update so the next
meta-step's first chunk still carries a meta-gradient) is `unroll.TruncatedUnroll`; the run around
this step (resume, the clock, signals, validation, checkpoints) is train/loop.py's, as for `dynlm train`.

Reliability as in static training: rotating checkpoints hold the learner, theta0, the static
weights, the optimizer, every RNG, the reading position and each stream's memory (fast weights,
rule state, hidden states, the held-back update), so `--resume` continues bit-exactly; SIGINT/SIGTERM save and stop;
a non-finite meta-loss or meta-gradient skips the step and restarts the streams' memory from
theta0; under torchrun each rank reads its own streams and the meta-gradients are all-reduced.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import distributed as D
from ..checkpoint import CheckpointError, check_model_matches, load_checkpoint
from ..config import Config, ConfigError, check_rule_layers, meta_steps
from ..data.streams import StreamLayout
from ..data.tokenizers import load_tokenizer
from ..prequential import perplexity, score
from ..model import LSTMLM
from ..progress import interactive
from ..rules import adapted_names, compute_grad_rms, learner_parameters, make_rule, with_consolidation
from ..rules.base import StaticRule
from ..reader import HeldUpdate, Reader
from ..unroll import Stepper, TruncatedUnroll
from .loop import Callback, Run, reading_positions, stream_layout

RESUME_MUST_MATCH = ("model", "data", "rule.learner", "rule.learner_hidden", "rule.learner_features", "rule.layers",
                     "rule.weights", "meta.batch_size",
                     "eval.segment_length", "meta.boundary", "meta.seed")
RESUME_MAY_DIFFER = ("data.cache_dir", "data.path")


def check_meta_config(cfg: Config) -> None:
    """What no single field's declaration (config/schema.py) can say: a ConfigError before any work."""
    check_rule_layers(cfg)
    m = cfg.meta
    if not (m.steps or m.max_tokens or m.max_minutes):
        raise ConfigError("nothing to meta-train: set meta.steps, meta.max_tokens or meta.max_minutes")
    if (m.ewc_lambda or m.consolidation == "input") and m.boundary != "continuous":
        what = f"meta.ewc_lambda={m.ewc_lambda:g}" if m.ewc_lambda else "meta.consolidation=input"
        raise ConfigError(f"{what} is a consolidation of continuous reading; it needs meta.boundary=continuous, "
                          f"not {m.boundary}")
    if m.consolidation == "penalty" and not m.ewc_lambda:
        raise ConfigError("meta.consolidation=penalty weighs the EWC penalty by meta.ewc_lambda, which is 0")


def fisher_roles(m) -> tuple[bool, bool]:
    """(penalty, input): whether the meta-loss adds the EWC penalty, and whether the learner reads F per
    coordinate (meta.consolidation; by default both when meta.ewc_lambda > 0)."""
    penalty = m.ewc_lambda > 0 and m.consolidation in ("ewc", "penalty")
    return penalty, (m.ewc_lambda > 0 and m.consolidation == "ewc") or m.consolidation == "input"


def meta_layout(articles, cfg: Config, eos_id: int, epoch: int, dinfo: D.DistInfo = D.DistInfo()) -> StreamLayout:
    """Epoch `epoch`'s reading order, as this rank's share of meta.batch_size streams of eval.segment_length tokens."""
    m = cfg.meta
    return stream_layout(articles, m.seed, m.batch_size, cfg.eval.segment_length, eos_id, epoch, m.boundary == "reset", dinfo,
                         "meta.batch_size")


def ewc_fisher(lm, params, articles, cfg: Config, names, eos_id, device) -> dict:
    """Diagonal empirical Fisher of the per-token loss, in the units of standard EWC (Kirkpatrick et
    al. 2017): F = E[(d loss_token / d theta)^2], estimated from the squared gradient of each training
    segment's mean loss (one stream, eval.segment_length tokens), which is about F / eval.segment_length when the tokens'
    gradients are independent: F = eval.segment_length * E[g_segment^2]."""
    layout = StreamLayout(articles, cfg.meta.batch_size, cfg.eval.segment_length, eos_id)
    rms = compute_grad_rms(lm, params, layout, names, cfg.meta.ewc_chunks, device, stat="stream")
    return {k: cfg.eval.segment_length * v.pow(2) for k, v in rms.items()}


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


def metatrain(cfg: Config, run_dir: Path, init: Path | None = None, resume: bool = False,
              callbacks: tuple[Callback, ...] = ()) -> dict:
    """Meta-train the learned rule; returns a result dict (on every rank). result['stopped_by']
    names the signal when SIGINT/SIGTERM ended the run early (after saving a checkpoint)."""
    check_meta_config(cfg)
    with D.session(cfg.run.device) as (dinfo, device):
        return _metatrain(cfg, Path(run_dir), Path(init) if init else None, resume, dinfo, device, callbacks)


def _metatrain(cfg: Config, run_dir: Path, init: Path | None, resume: bool, dinfo: D.DistInfo, device,
               callbacks: tuple[Callback, ...] = ()) -> dict:
    m = cfg.meta
    torch.manual_seed(m.seed)
    base = load_checkpoint(init, map_location=device) if init else None
    if base is not None:
        check_model_matches(base, cfg, init)

    def copy_tokenizer():  # the static run's, copied atomically
        if base is not None and not (run_dir / "tokenizer").exists():
            load_tokenizer(init.resolve().parent.parent / "tokenizer").save(run_dir / "tokenizer")
    run = Run(cfg, run_dir, "meta", dinfo, device, callbacks)
    tok, splits = run.prepare_data("meta", before=copy_tokenizer)
    if base is not None and tok.fingerprint() != base["tokenizer_fingerprint"]:
        raise CheckpointError(f"{run_dir / 'tokenizer'} does not match the vocabulary of {init}; "
                              "use a fresh --out directory")
    trainer = MetaTrainer(run, tok.eos_id, tok.vocab_size, splits["train"], splits["valid"],
                          base["params"] if base is not None else None, init)
    ck = run.resume_or_start(resume, {**trainer.static, **trainer.theta0}, RESUME_MUST_MATCH, RESUME_MAY_DIFFER)
    if ck is not None:
        trainer.load_state_dict(ck)
    rule, names = trainer.rule, list(trainer.theta0)
    run.announce(f"meta-learner ({cfg.rule.learner}, hidden {cfg.rule.learner_hidden}): "
                 f"{sum(p.numel() for p in rule.parameters())} parameters, rewriting {len(names)} tensors "
                 f"({sum(trainer.theta0[k].numel() for k in names):,} weights) per stream; K={m.unroll}, "
                 f"chunks of {cfg.eval.segment_length} tokens, {'second' if m.second_order else 'first'}-order, boundary={m.boundary}"
                 + (", checkpointed" if m.checkpoint else "") + (f", EWC penalty {m.ewc_lambda}" if trainer.fisher else "")
                 + (", Fisher as the learner's input" if rule.consolidation else ""))
    stopped_by = run.loop(trainer, "metatrain", meta_steps(cfg) or None)
    ckpt_dir = run.ckpt_dir
    ckpt = ckpt_dir / ("best.pt" if (ckpt_dir / "best.pt").exists() else "last.pt")
    return run.finish({"steps": run.state.step, "minutes": run.minutes(), "tokens": run.state.tokens,
                       "checkpoint": str(ckpt), "skipped_steps": run.guard.skipped, "stopped_by": stopped_by,
                       **run.valid_metrics})


class MetaTrainer:
    """Meta-training's step (see loop.Trainer): one truncated unroll of K chunks of every stream, the
    meta-gradient into the learner (and theta0 / the static weights), Adam, the streams read on."""
    validate_on_stop = True  # the learner's validation perplexity at the step where it stopped

    def __init__(self, run: Run, eos_id: int, vocab_size: int, train_arts, valid_arts, params: dict | None,
                 init: Path | None):
        cfg, m, device = run.cfg, run.cfg.meta, run.device
        self.run, self.m, self.eos_id, self.train_arts, self.init = run, m, eos_id, train_arts, init
        self.lm = lm = LSTMLM(cfg.model, vocab_size)
        params = params if params is not None else lm.init_params(cfg.train.seed, device=device)
        names = adapted_names(lm, cfg.rule, "learned", params)
        self.rule = make_rule("learned", cfg.rule, names).to(device)
        self.static, self.theta0, self.opt, self.trained = meta_parameters(params, names, self.rule, m, device)
        penalty, as_input = fisher_roles(m)
        fisher = (ewc_fisher(lm, {**self.static, **self.theta0}, train_arts, cfg, names, eos_id, device)
                  if penalty or as_input else None)
        if as_input:  # the third level, per coordinate: the learner sees how much each weight matters
            self.rule.consolidation = consolidation_input(fisher)
        self.fisher = fisher if penalty else None  # what the meta-loss weighs the drift from theta0 with
        self.unroll = TruncatedUnroll(Stepper(lm, self.static, self.theta0, self.rule, boundary=m.boundary, meta=True,
                                              second_order=m.second_order, checkpoint=m.checkpoint),
                                      m.unroll, fisher=self.fisher)
        # the static model reading the same chunks, for the logs: the gain we are after
        self.baseline = Stepper(lm, self.static, self.theta0, StaticRule(), boundary=m.boundary)
        self.reader, self.static_reader, self.positions = None, None, None  # the streams' memory, both models
        self.valid_arts = valid_arts[: m.valid_articles] if m.valid_articles else valid_arts
        self.static_valid_ppl = None
        self.window = {"dyn": 0.0, "static": 0.0, "n": 0, "forget": 0.0, "input": 0.0, "k": 0}
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def load_state_dict(self, ck: dict) -> None:
        """The trainer's part of a checkpoint (loop.Run restores the rest)."""
        device, d = self.run.device, self.run.dinfo
        self.rule.load_state_dict(learner_parameters(ck["learner"]))
        with torch.no_grad():
            for k, v in ck["params"].items():
                (self.theta0 if k in self.theta0 else self.static)[k].copy_(v)
        self.opt.load_state_dict(ck["optimizer"])
        if ck["reader"] is not None:
            rows = D.shard_slice(ck["reader"]["static_hidden"][0][0].shape[0], d.rank, d.world_size)
            r = {kind: _rows(v, rows, device) for kind, v in ck["reader"].items()}
            self.reader = Reader(r["hidden"], r["fast"], r["rule_state"],
                                 HeldUpdate(**r["held"]) if "held" in r else None)  # older checkpoints: none
            self.static_reader = Reader(r["static_hidden"], {}, {})

    def state_dict(self) -> dict:
        """Weights, learner, optimizer, every stream's memory (collective under torchrun)."""
        return {"params": {**{k: v.detach() for k, v in self.static.items()},
                           **{k: v.detach() for k, v in self.theta0.items()}},
                "learner": with_consolidation(self.rule.state_dict(), self.rule.consolidation),
                "optimizer": self.opt.state_dict(), "reader": self._gathered_reader(),
                "base_checkpoint": str(self.init) if self.init else None}

    def _gathered_reader(self):
        reader = self.reader
        if reader is None:
            return None
        local = {"hidden": reader.hidden, "fast": reader.fast, "rule_state": reader.rule_state,
                 "static_hidden": self.static_reader.hidden}
        if reader.held is not None:
            local["held"] = dict(vars(reader.held))  # the held-back update: drift, grads, rule_state, loss, active
        local = _detach_cpu(local)
        return _cat_rows(D.gather_objects(local)) if self.run.dinfo.enabled else local

    def done(self) -> bool:
        m = self.m
        limit = meta_steps(self.run.cfg)
        return bool(limit) and self.run.state.step >= limit or bool(m.max_minutes) and self.run.minutes() > m.max_minutes

    def step(self) -> tuple[bool, bool]:
        """One meta-step; returns (validation due, save due): every meta.eval_every and
        meta.checkpoint_every steps."""
        run, m, s = self.run, self.m, self.run.state
        if self.positions is None:  # from the (possibly resumed) reading position
            self.positions = reading_positions(
                lambda e: meta_layout(self.train_arts, run.cfg, self.eos_id, e, run.dinfo), s.epoch, s.chunk)
        read = [next(self.positions) for _ in range(m.unroll)]
        epoch, c, layout = read[-1]
        # a new epoch (chunk 0) reads a new layout: new streams
        meta_step = self.unroll(self.reader, [(lay.chunk(i).to(run.device), i == 0) for _, i, lay in read])
        self._score_static(meta_step)
        s.epoch, s.chunk = epoch, c + 1  # where a resumed run continues reading
        n_global = self._outer_step(meta_step, layout.n_streams)
        del meta_step  # the graph
        s.step += 1
        s.tokens += n_global
        self.window_tokens += n_global
        run.bar.update()
        if s.step % m.log_every == 0 or s.step == m.steps:
            self._log(epoch + s.chunk / len(layout))
        return bool(m.eval_every) and s.step % m.eval_every == 0, s.step % m.checkpoint_every == 0

    def _outer_step(self, meta_step, n_streams: int) -> int:
        """Back-propagate the meta-loss, all-reduce, clip, and step unless it is not finite (then the
        streams' memory, which may hold NaNs, restarts from theta0); returns the global token count."""
        run, m = self.run, self.m
        n_global = D.all_reduce_sum(meta_step.tokens)  # every rank divides by the global count: exact global mean
        loss = meta_step.nll / max(n_global, 1)
        if self.fisher is not None:
            # standard EWC: (lambda / 2) sum_i F_i (theta_i - theta0_i)^2 on top of the per-token mean loss,
            # averaged over the streams and the K fast-weight states of the unroll
            loss = loss + 0.5 * m.ewc_lambda * meta_step.penalty / (m.unroll * D.all_reduce_sum(n_streams))
        loss = run.on_loss(loss)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        D.all_reduce_grads(self.trained)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, m.clip)
        if run.guard.check(run.state.step, loss=D.all_reduce_sum(loss.detach()), grad_norm=grad_norm):
            self.opt.step()
            self.reader = meta_step.reader  # truncated: keep reading the same articles
        else:
            self.opt.zero_grad(set_to_none=True)
            self.reader = self.unroll.start(n_streams, run.device)
        return n_global

    def _score_static(self, meta_step) -> None:
        """The static model on the meta-step's chunks, and both models' losses into the log window."""
        w = self.window
        for r in meta_step.chunks:
            if self.static_reader is None or r.restarted:
                self.static_reader = self.baseline.start(r.chunk.inputs.shape[0], self.run.device)
            with torch.no_grad():
                nll, self.static_reader, _ = self.baseline.step(self.static_reader, r.chunk)
            w["static"] += float(nll.sum())
            w["dyn"] += float(r.nll.detach().sum()); w["n"] += r.tokens
            w["forget"] += float(r.stats["forget"]); w["input"] += float(r.stats["input"])
            w["k"] += 1

    def _log(self, epoch: float) -> None:
        """The window's losses, the learned rule's gain over the static model and its gates."""
        run, w, now = self.run, self.window, time.perf_counter()
        gain = (w["static"] - w["dyn"]) / max(w["n"], 1)
        run.tracker.log({"meta/loss": w["dyn"] / w["n"], "meta/static_loss": w["static"] / w["n"],
                         "meta/gain": gain, "meta/forget_gate": w["forget"] / w["k"],
                         "meta/input_gate": w["input"] / w["k"], "meta/skipped_steps": run.guard.skipped,
                         "meta/tokens_per_s": self.window_tokens / (now - self.window_start), "meta/epoch": epoch},
                        step=run.state.step, echo=not interactive())  # on a terminal the bar shows the gain
        run.bar.set_postfix(gain=f"{gain:+.4f}")
        self.window = dict.fromkeys(w, 0.0)
        self.window_start, self.window_tokens = now, 0

    def validate(self) -> tuple[float, dict] | None:
        """Prequential ppl of learned vs static on validation articles (rank 0 only; no collectives)."""
        if not self.run.main:
            return None
        e, m = self.run.cfg.eval, self.m
        weights = {**{k: v.detach() for k, v in self.static.items()}, **{k: v.detach() for k, v in self.theta0.items()}}
        kw = dict(eos_id=self.eos_id, segment_length=e.segment_length, batch_size=e.batch_size, boundary=e.boundary,
                  device=self.run.device)
        if self.static_valid_ppl is None or m.theta0_lr > 0 or m.static_lr > 0:
            s = score(self.lm, weights, self.valid_arts, desc="valid static", **kw)
            self.static_valid_ppl = perplexity(float(s.nll.sum()), len(s.nll))
        s = score(self.lm, weights, self.valid_arts, rule=self.rule, names=list(self.theta0), desc="valid learned", **kw)
        learned = perplexity(float(s.nll.sum()), len(s.nll))
        return learned, {"meta/valid_ppl_static": self.static_valid_ppl, "meta/valid_ppl_learned": learned,
                         "meta/valid_rel_change": learned / self.static_valid_ppl - 1}


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
