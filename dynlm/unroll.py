"""One prequential chunk step, and reading a stream with any update rule.

Each chunk is scored with the weights the model had *before* seeing it; only then does
the rule update the weights. The same step serves evaluation (`meta=False`: everything
is detached after each step) and meta-training (`meta=True`: the graph is kept so the
summed prequential loss can be back-propagated into the learner, and into theta0 when
`meta.theta0_lr` > 0; by default it is not).

`chunk_step` is the pure core (weights and memory in, new memory out); `Stepper` binds the model,
the weights and the rule once and is what every reader uses (evaluation, meta-training, bench, cost):
`start(batch, device)`, then `step(reader, chunk)`, which also resets streams that start an article.

Meta-training reads K chunks per meta-step (`TruncatedUnroll`), back-propagates, and truncates.
The last chunk's rule update is then held back as its detached inputs (`HeldUpdate`) and replayed
at the start of the next unroll, inside its graph (both in `reader.py`): the next unroll's first chunk is scored with
weights that depend on the learner (and on theta0), so every chunk read contributes to exactly one
meta-loss term, while no gradient crosses the truncation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterable

import torch
from torch import Tensor

from .data.streams import Chunk
from .device import autocast
from .model import LSTMLM, Params
from .reader import Reader, as_dtype, detach_all, replay_held, reset_streams, start_reader, truncate
from .rules.base import LazyRows, Rule


BOUNDARIES = ("reset", "continuous")


class Stepper:
    """(model, static weights, theta0, rule) bound once: what reads streams of chunks.

    static: the weights the rule leaves alone (a key also in theta0 is theta0's); theta0: the adapted
    weights' starting point, (...) each, so its keys are the adapted names. boundary="reset": a stream
    that starts a new article goes back to theta0, a zero state and fresh rule state before the chunk.
    meta, second_order, checkpoint: `chunk_step`'s (meta-training keeps the graph); bf16: autocast the
    step (evaluation), the hidden state handed back in the weights' dtype. Pure: `step` returns a new
    reader and leaves its argument alone."""

    def __init__(self, lm: LSTMLM, static: Params, theta0: Params, rule: Rule, *, boundary: str = "continuous",
                 bf16: bool = False, meta: bool = False, second_order: bool = False, checkpoint: bool = False):
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary={boundary!r}; valid: {', '.join(BOUNDARIES)}")
        self.lm, self.theta0, self.rule, self.boundary, self.bf16 = lm, theta0, rule, boundary, bf16
        self.weights = {**static, **theta0}  # what the model reads; each stream's fast weights replace theta0's
        self.dtype = next(iter(self.weights.values())).dtype
        self.meta, self.second_order, self.checkpoint = meta, second_order, checkpoint

    def start(self, batch: int, device) -> Reader:
        """Fresh streams at theta0. When theta0 is trained, the fast weights are theta0 itself in the
        graph (not a detached copy), so the streams' first chunk still carries its meta-gradient."""
        reader = start_reader(self.lm, self.theta0, self.rule, list(self.theta0), batch, device, dtype=self.dtype)
        if reader.fast and any(v.requires_grad for v in self.theta0.values()):
            reader = reset_streams(reader, self.theta0, self.rule, torch.ones(batch, dtype=torch.bool, device=device))
        return reader

    def step(self, reader: Reader, chunk: Chunk) -> tuple[Tensor, Reader, dict]:
        """Reset the streams that start an article (boundary="reset"), then `chunk_step`: nll (B, T),
        the new reader, the rule's stats."""
        if self.boundary == "reset":
            reader = reset_streams(reader, self.theta0, self.rule, chunk.new_article)
        with autocast(chunk.inputs.device, self.bf16):
            nll, reader, stats = chunk_step(self.lm, self.weights, self.theta0, self.rule, reader, chunk, meta=self.meta,
                                            second_order=self.second_order, checkpoint=self.checkpoint)
        if self.bf16:
            reader = Reader(as_dtype(reader.hidden, self.dtype), reader.fast, reader.rule_state, reader.held)
        return nll, reader, stats


def chunk_step(lm: LSTMLM, params: Params, theta0: Params, rule: Rule, reader: Reader, chunk: Chunk, *,
               meta: bool = False, second_order: bool = False, checkpoint: bool = False) -> tuple[Tensor, Reader, dict]:
    """Score `chunk` with the current weights, then let the rule update them.

    Returns nll (B, T), the new reader, and stats (the rule's gate means, and "out": the top-layer
    outputs (B, T, H), detached, for the neural cache; with meta=True also "held", the update's
    inputs, for `truncate`). checkpoint (meta-training): keep only the step's inputs (every stream's
    fast weights, rule state, hidden state and, in first order, the inner gradient) and recompute the
    rest in backward; memory still grows with the unroll length by those inputs per step (8.2x from
    K=4 to 64 checkpointed, 13.8x without; docs/performance.md)."""
    if not (checkpoint and meta):
        return _chunk_step(lm, params, theta0, rule, reader, chunk, meta, second_order)
    if second_order:
        return _second_order_checkpoint(lm, params, theta0, rule, reader, chunk)
    # The inner gradient is a constant in first order, so it is taken outside the checkpointed region:
    # an autograd.grad inside it would unpack (recompute and keep) the region's tensors during forward.
    inner = _inner_gradient(lm, params, reader, chunk) if rule.adapts else None
    return torch.utils.checkpoint.checkpoint(_eager_chunk_step, lm, params, theta0, rule, reader, chunk, meta, False,
                                             inner, use_reentrant=False)


def _eager_chunk_step(lm, params, theta0, rule, *args):
    """_chunk_step with the rule's update eager, in forward and in the recomputation alike: a compiled
    update (its own autograd node) recomputed inside torch.utils.checkpoint's backward breaks the
    checkpoint's bookkeeping of saved tensors ("target_frame.early_stop is set")."""
    with rule.eager():
        return _chunk_step(lm, params, theta0, rule, *args)


def _inner_gradient(lm, params, reader, chunk) -> tuple[Params, Tensor]:
    """Each stream's gradient of its own mean chunk loss w.r.t. its fast weights, off the outer graph."""
    fast = {k: v.detach().requires_grad_() for k, v in reader.fast.items()}
    weights = {**{k: v.detach() for k, v in params.items()}, **fast}
    with torch.enable_grad():
        out, _ = lm.hidden(weights, chunk.inputs, [(h.detach(), c.detach()) for h, c in reader.hidden])
        loss = (lm.nll(weights, out, chunk.targets) * chunk.mask).sum(1) / chunk.mask.sum(1).clamp(min=1)  # (B,)
        # allow_unused: with one stream, the shared adaptive softmax skips tail clusters no target falls in
        grads = torch.autograd.grad(loss.sum(), list(fast.values()), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, fast.values())]
    return dict(zip(fast, grads)), loss.detach()


def _chunk_step(lm, params, theta0, rule, reader, chunk, meta, second_order, inner=None):
    # -- sparse rows (evaluation): an input-only embedding (the adaptive softmax has its own output
    # weights) is read and updated as a block of the rows the chunk reads; see rules.base.LazyRows
    lazy = None
    if not meta and rule.sparse_rows and "embed" in reader.fast and lm.adaptive:
        lazy = LazyRows(rule, "embed", reader.fast["embed"], theta0, reader.rule_state, chunk.inputs)
        reader, theta0 = Reader(reader.hidden, {**reader.fast, "embed": lazy.block}, lazy.state), lazy.theta0
    # -- end sparse rows
    if not meta or any(not v.requires_grad for v in reader.fast.values()):
        # evaluation, or just after truncation: the weights are constants we differentiate at
        reader = Reader(reader.hidden, {k: v if meta and v.requires_grad else v.detach().requires_grad_()
                                        for k, v in reader.fast.items()}, reader.rule_state)
    with torch.enable_grad() if rule.adapts else torch.no_grad():
        weights = {**params, **reader.fast}
        out, hidden = lm.hidden(weights, chunk.inputs if lazy is None else lazy.inputs, reader.hidden,
                                double_backward=meta and second_order)
        nll = lm.nll(weights, out, chunk.targets) * chunk.mask  # (B, T)
        if not rule.adapts:
            return nll, Reader(hidden, reader.fast, reader.rule_state), {"out": out.detach()}
        if inner is None:
            loss = nll.sum(1) / chunk.mask.sum(1).clamp(min=1)  # (B,) each stream's own mean: its gradient is that stream's
            grads = torch.autograd.grad(loss.sum(), list(reader.fast.values()), retain_graph=meta,
                                        create_graph=meta and second_order, allow_unused=True)
            # first order: the learner sees the gradient as a constant input (the paper's choice). A weight
            # the loss does not reach has a zero gradient: with B = 1 the adaptive softmax takes the shared
            # kernel, which skips the tail clusters no target of the chunk falls in
            grads = {k: torch.zeros_like(w) if g is None else g if second_order else g.detach()
                     for (k, w), g in zip(reader.fast.items(), grads)}
            loss = loss.detach()
        else:
            grads, loss = inner
    # evaluation: the update is not differentiated (the fast weights are leaves that require grad, and a
    # learner's parameters do): without no_grad every op of it would record a graph and keep its tensors
    with contextlib.nullcontext() if meta else torch.no_grad():
        fast, rule_state, stats = rule.update(reader.fast, grads, theta0, reader.rule_state, loss,
                                              **({} if lazy is None else {"rows": {"embed": lazy.rows}}))
    active = chunk.mask.any(1)  # (B,)
    if not bool(active.all()):  # padding rows (streams that have run out) must not move
        if meta:
            fast = {k: torch.where(active.view(-1, *([1] * (w.dim() - 1))), w, reader.fast[k]) for k, w in fast.items()}
        else:  # the update's own new tensors (made under no_grad): written in place, not copied whole
            idle = (~active).nonzero().squeeze(1)
            with torch.no_grad():
                for k, w in fast.items():
                    if w is not reader.fast[k]:
                        w.index_copy_(0, idle, reader.fast[k].index_select(0, idle))
    if lazy is not None:  # the block back into the whole embedding (sparse rows)
        fast, rule_state = lazy.write_back(fast, rule_state, active)
    new = Reader(hidden, fast, rule_state)
    stats["out"] = out.detach()
    if meta:  # the update's inputs, for a truncation after this chunk (see HeldUpdate, truncate)
        stats["held"] = (detach_all(reader.fast), detach_all(grads), detach_all(reader.rule_state), loss.detach(), active)
    return (nll if meta else nll.detach()), (new if meta else new.detached()), stats


# ---- the truncated unroll of meta-training ----------------------------------------------------

@dataclass
class UnrolledChunk:
    """One chunk of a meta-step, as read."""
    chunk: Chunk
    restarted: bool  # the streams started afresh (from theta0) just before it
    nll: Tensor  # (B, T) prequential NLL, masked, in the graph
    tokens: int  # real targets in the chunk
    stats: dict  # the rule's stats for its update (without "out" and "held")


@dataclass
class MetaStep:
    """One meta-step's unroll: what to back-propagate, and where reading continues."""
    nll: Tensor  # summed prequential NLL of the K chunks (scalar, in the graph)
    tokens: int  # real targets read: the loss is nll / tokens (summed over ranks)
    penalty: Tensor | float  # summed consolidation penalty over the K chunks (0.0 without fisher)
    reader: Reader  # the memory to continue from: truncated (detached), holding back the last update
    chunks: list[UnrolledChunk] = field(default_factory=list)


class TruncatedUnroll:
    """Meta-training's truncated unroll, in one place (dynlm metatrain, bench and the cost model).

    One call reads K chunks prequentially with `stepper` (meta=True: the graph is kept) and returns
    the summed NLL, the token count, the optional consolidation penalty and the truncated reader.
    Every chunk read enters exactly one meta-loss term, scored with weights that depend on the
    learner: the update the previous unroll's last chunk made is held back at truncation and
    replayed here, in this graph, before the first chunk (see HeldUpdate). Streams that start
    afresh (no reader, a new epoch's layout, or a new article with boundary="reset") go back to
    theta0: a held update does not leak into them.

    fisher: per-tensor diagonal Fisher for the EWC penalty sum_k fisher_k (fast_k - theta0_k)^2,
    summed over streams and chunks after each update; the caller weights and normalises it."""

    def __init__(self, stepper: Stepper, k: int, *, fisher: Params | None = None):
        if k < 1:
            raise ValueError(f"the unroll needs k >= 1 chunks, got {k}")
        if not stepper.meta:
            raise ValueError("the unroll back-propagates through its chunk steps: it needs a Stepper(meta=True)")
        self.stepper, self.k, self.fisher = stepper, k, fisher

    def start(self, n_streams: int, device) -> Reader:
        """Fresh streams at theta0 (see Stepper.start)."""
        return self.stepper.start(n_streams, device)

    def __call__(self, reader: Reader | None, chunks: Iterable[Chunk | tuple[Chunk, bool]]) -> MetaStep:
        """reader: where the previous meta-step left off (None: start). chunks: the next K chunks (more
        are not consumed), each a Chunk or (Chunk, restart) where restart starts new streams before
        it (a new epoch's layout)."""
        s, theta0 = self.stepper, self.stepper.theta0
        total, tokens, penalty, read, stats = 0.0, 0, 0.0, [], None
        for item in islice(chunks, self.k):
            chunk, restart = item if isinstance(item, tuple) else (item, False)
            restarted = reader is None or restart
            if restarted:
                reader = s.start(chunk.inputs.shape[0], chunk.inputs.device)
            elif reader.held is not None:  # the previous unroll's last update, now in this graph
                reader = replay_held(reader, s.rule, theta0)
            nll, reader, stats = s.step(reader, chunk)  # after the replay: a stream starting an article takes theta0
            if self.fisher is not None:  # long-term consolidation: stay near theta0 where it matters
                penalty = penalty + sum((self.fisher[k] * (reader.fast[k] - theta0[k]).pow(2)).sum()
                                        for k in reader.fast)
            n = int(chunk.mask.sum())
            total, tokens = total + nll.sum(), tokens + n
            read.append(UnrolledChunk(chunk, restarted, nll, n,
                                      {k: v for k, v in stats.items() if k not in ("out", "held")}))
        if len(read) != self.k:
            raise ValueError(f"the unroll needs {self.k} chunks, got {len(read)}")
        return MetaStep(total, tokens, penalty, truncate(reader, theta0, stats), read)


# ---- checkpointing a second-order step ----------------------------------------------------------
# A second-order step differentiates through its own inner gradient, so torch.utils.checkpoint
# (which would have to recompute the step inside its own forward to take that gradient) keeps
# everything. Instead the step runs as one autograd Function: forward computes its values without
# any graph (they do not depend on create_graph) and keeps only its inputs; backward recomputes the
# step with the double-backward graph and takes its vector-Jacobian product. The learner's
# parameters are explicit inputs (substituted by functional_call), so autograd routes their
# gradients like any other.

def _reader_tensors(reader: Reader) -> list[Tensor]:
    return [t for hc in reader.hidden for t in hc] + list(reader.fast.values()) + list(reader.rule_state.values())


def _rebuild_reader(like: Reader, tensors: list[Tensor]) -> Reader:
    it = iter(tensors)
    hidden = [(next(it), next(it)) for _ in like.hidden]
    return Reader(hidden, {k: next(it) for k in like.fast}, {k: next(it) for k in like.rule_state})


class _RuleStep(torch.nn.Module):
    """One chunk step as a module call, so functional_call can swap in the learner's parameters."""

    def __init__(self, lm, rule, chunk):
        super().__init__()
        self.lm, self.rule, self.chunk = lm, rule, chunk

    def forward(self, params, theta0, reader, second_order):
        return _chunk_step(self.lm, params, theta0, self.rule, reader, self.chunk, True, second_order)


class _SecondOrderStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, *tensors):
        ctx.run = run
        ctx.save_for_backward(*tensors)
        outs = run(list(tensors), second_order=False)  # same values, no double-backward graph
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outs = ctx.run(inputs, second_order=True)
        used = [(o, g) for o, g in zip(outs, grad_outs) if g is not None and o.requires_grad]
        wrt = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in used], wrt, [g for _, g in used], allow_unused=True)
                     if used and wrt else [None] * len(wrt))
        return (None, *[next(grads) if t.requires_grad else None for t in inputs])


def _second_order_checkpoint(lm, params, theta0, rule, reader, chunk):
    names = {"params": list(params), "theta0": list(theta0), "rule": [k for k, _ in rule.named_parameters()]}
    flat = ([params[k] for k in names["params"]] + [theta0[k] for k in names["theta0"]]
            + [q for _, q in rule.named_parameters()] + _reader_tensors(reader))
    sizes = [len(names["params"]), len(names["theta0"]), len(names["rule"])]
    step = _RuleStep(lm, rule, chunk)
    kept: dict = {}  # the forward's new reader (its structure) and stats

    def run(tensors, second_order):
        a, b, c = sizes[0], sizes[0] + sizes[1], sum(sizes)
        p = dict(zip(names["params"], tensors[:a]))
        t0 = dict(zip(names["theta0"], tensors[a:b]))
        learner = {f"rule.{k}": v for k, v in zip(names["rule"], tensors[b:c])}
        nll, new, stats = torch.func.functional_call(step, learner, (p, t0, _rebuild_reader(reader, tensors[c:]),
                                                                   second_order))
        if not second_order:
            kept.update(reader=new, stats=stats)
        return [nll, *_reader_tensors(new)]

    outs = _SecondOrderStep.apply(run, *flat)
    return outs[0], _rebuild_reader(kept["reader"], list(outs[1:])), kept["stats"]
