"""One prequential chunk step, and reading a stream with any update rule.

Each chunk is scored with the weights the model had *before* seeing it; only then does
the rule update the weights. The same step serves evaluation (`meta=False`: everything
is detached after each step) and meta-training (`meta=True`: the graph is kept so the
summed prequential loss can be back-propagated into the learner and theta0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .data.streams import Chunk
from .model import LSTMLM, Params, State
from .rules.base import Rule, RuleState


@dataclass
class Reader:
    """Per-stream memory carried from chunk to chunk."""
    hidden: State  # short-term memory
    fast: Params  # medium-term memory: adapted weights, (B, ...)
    rule_state: RuleState

    def detached(self) -> "Reader":
        """Truncation: no gradient flows into earlier chunks."""
        return Reader([(h.detach(), c.detach()) for h, c in self.hidden],
                      {k: v.detach() for k, v in self.fast.items()},
                      {k: v.detach() for k, v in self.rule_state.items()})


def start_reader(lm: LSTMLM, theta0: Params, rule: Rule, names: list[str], batch: int, device) -> Reader:
    # materialised (not a stride-0 expand): every later update is a dense tensor of the same layout
    fast = {k: theta0[k].detach().expand(batch, *theta0[k].shape).clone() for k in names} if rule.adapts else {}
    dtype = next(iter(theta0.values())).dtype
    return Reader(lm.init_state(batch, device=device, dtype=dtype), fast, rule.init_state(fast) if fast else {})


def reset_rows(state: State, new_article: torch.Tensor) -> State:
    """Zero the hidden state of streams that start a new article. new_article (B,)."""
    if not bool(new_article.any()):
        return state
    keep = (~new_article).to(state[0][0].dtype).unsqueeze(1)  # (B, 1)
    return [(h * keep, c * keep) for h, c in state]


def reset_streams(reader: Reader, theta0: Params, rule: Rule, new_article: Tensor) -> Reader:
    """Streams starting a new article go back to theta0, a zero hidden state and fresh rule state."""
    if not bool(new_article.any()):
        return reader

    def pick(fresh, old):  # (B, ...) where new_article, else old
        return torch.where(new_article.view(-1, *([1] * (old.dim() - 1))), fresh, old)

    hidden = reset_rows(reader.hidden, new_article)
    fast = {k: pick(theta0[k].expand_as(w), w) for k, w in reader.fast.items()}
    fresh = rule.init_state(fast) if fast else {}
    return Reader(hidden, fast, {k: pick(fresh[k], v) for k, v in reader.rule_state.items()})


def chunk_step(lm: LSTMLM, params: Params, theta0: Params, rule: Rule, reader: Reader, chunk: Chunk, *,
               meta: bool = False, second_order: bool = False, checkpoint: bool = False) -> tuple[Tensor, Reader, dict]:
    """Score `chunk` with the current weights, then let the rule update them.

    Returns nll (B, T), the new reader, and stats (the rule's gate means, and "out": the top-layer
    outputs (B, T, H), detached, for the neural cache). checkpoint (meta-training): keep nothing of
    the step for the backward pass but its inputs and recompute it then, so memory does not grow
    with the unroll length (the paper's "hidden-state memorization")."""
    if not (checkpoint and meta):
        return _chunk_step(lm, params, theta0, rule, reader, chunk, meta, second_order)
    if second_order:
        return _second_order_checkpoint(lm, params, theta0, rule, reader, chunk)
    # The inner gradient is a constant in first order, so it is taken outside the checkpointed region:
    # an autograd.grad inside it would unpack (recompute and keep) the region's tensors during forward.
    inner = _inner_gradient(lm, params, reader, chunk) if rule.adapts else None
    return torch.utils.checkpoint.checkpoint(_chunk_step, lm, params, theta0, rule, reader, chunk, meta, False, inner,
                                             use_reentrant=False)


def _inner_gradient(lm, params, reader, chunk) -> tuple[Params, Tensor]:
    """Each stream's gradient of its own mean chunk loss w.r.t. its fast weights, off the outer graph."""
    fast = {k: v.detach().requires_grad_() for k, v in reader.fast.items()}
    weights = {**{k: v.detach() for k, v in params.items()}, **fast}
    with torch.enable_grad():
        out, _ = lm.hidden(weights, chunk.inputs, [(h.detach(), c.detach()) for h, c in reader.hidden])
        loss = (lm.nll(weights, out, chunk.targets) * chunk.mask).sum(1) / chunk.mask.sum(1).clamp(min=1)  # (B,)
        grads = torch.autograd.grad(loss.sum(), list(fast.values()))
    return dict(zip(fast, grads)), loss.detach()


def _chunk_step(lm, params, theta0, rule, reader, chunk, meta, second_order, inner=None):
    if not meta or any(not v.requires_grad for v in reader.fast.values()):
        # evaluation, or just after truncation: the weights are constants we differentiate at
        reader = Reader(reader.hidden, {k: v if meta and v.requires_grad else v.detach().requires_grad_()
                                        for k, v in reader.fast.items()}, reader.rule_state)
    with torch.enable_grad() if rule.adapts else torch.no_grad():
        weights = {**params, **reader.fast}
        out, hidden = lm.hidden(weights, chunk.inputs, reader.hidden, double_backward=meta and second_order)
        nll = lm.nll(weights, out, chunk.targets) * chunk.mask  # (B, T)
        if not rule.adapts:
            return nll, Reader(hidden, reader.fast, reader.rule_state), {"out": out.detach()}
        if inner is None:
            loss = nll.sum(1) / chunk.mask.sum(1).clamp(min=1)  # (B,) each stream's own mean: its gradient is that stream's
            grads = torch.autograd.grad(loss.sum(), list(reader.fast.values()), retain_graph=meta,
                                        create_graph=meta and second_order)
            # first order: the learner sees the gradient as a constant input (the paper's choice)
            grads = {k: g if second_order else g.detach() for k, g in zip(reader.fast, grads)}
            loss = loss.detach()
        else:
            grads, loss = inner
    fast, rule_state, stats = rule.update(reader.fast, grads, theta0, reader.rule_state, loss)
    active = chunk.mask.any(1)  # (B,)
    if not bool(active.all()):  # padding rows (streams that have run out) must not move
        fast = {k: torch.where(active.view(-1, *([1] * (w.dim() - 1))), w, reader.fast[k]) for k, w in fast.items()}
    new = Reader(hidden, fast, rule_state)
    stats["out"] = out.detach()
    return (nll if meta else nll.detach()), (new if meta else new.detached()), stats


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
    def forward(ctx, run, n_inputs, *tensors):
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
        return (None, None, *[next(grads) if t.requires_grad else None for t in inputs])


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

    outs = _SecondOrderStep.apply(run, len(flat), *flat)
    return outs[0], _rebuild_reader(kept["reader"], list(outs[1:])), kept["stats"]
