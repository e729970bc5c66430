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
    outputs (B, T, H), detached, for the neural cache). checkpoint (first-order meta-training):
    keep nothing of the step for the backward pass but its inputs and recompute it then, so memory
    does not grow with the unroll length (the paper's "hidden-state memorization")."""
    if not (checkpoint and meta):
        return _chunk_step(lm, params, theta0, rule, reader, chunk, meta, second_order)
    if second_order:
        raise ValueError("gradient checkpointing supports first-order meta-training only: a second-order "
                         "step differentiates through its own inner gradient, which a checkpoint cannot hold")
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
