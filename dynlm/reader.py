"""A stream's memory while it reads: the short-term hidden state, the medium-term fast weights and
the rule's state (`Reader`), and what happens to it at the edges: fresh streams (`start_reader`),
article starts (`reset_streams`), the truncation of meta-training (`truncate`), and the update held
back across a truncation and replayed after it (`HeldUpdate`, `replay_held`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import LSTMLM, Params, State
from .rules.base import Rule, RuleState


@dataclass
class HeldUpdate:
    """The rule update of the last chunk before a truncation, as its detached inputs. The next
    unroll replays it (`replay_held`) inside its own graph, so its first chunk is scored with
    weights that depend on the learner's parameters and theta0 as they are then (after the outer
    step); the inputs are constants, so no gradient crosses the truncation.

    The weights the chunk was scored with are held as their drift from theta0: replayed, they are
    theta0 + drift, so they follow theta0 (values and gradient) the way the rule itself reads them
    (theta' = theta0 + f (theta - theta0) - ...). A stream that had just started from theta0 has
    drift exactly 0 and is replayed at theta0 itself, as within an unroll. With unchanged
    parameters the replay gives the weights the update gave, up to rounding."""
    drift: Params  # the weights the chunk was scored with (before the update) minus theta0, (B, ...)
    grads: Params  # the chunk's inner gradient, (B, ...)
    rule_state: RuleState  # the rule state before the update
    loss: Tensor  # (B,) each stream's mean NLL on the chunk
    active: Tensor  # (B,) bool: streams that read real tokens (padding rows keep their weights)


def detach_all(d: dict) -> dict:
    """Every tensor of a dict detached."""
    return {k: v.detach() for k, v in d.items()}


@dataclass
class Reader:
    """Per-stream memory carried from chunk to chunk."""
    hidden: State  # short-term memory
    fast: Params  # medium-term memory: adapted weights, (B, ...)
    rule_state: RuleState
    held: HeldUpdate | None = None  # set by `truncate`: the last update, to replay in the next unroll

    def detached(self) -> "Reader":
        """Everything detached (evaluation, and plain truncation that drops the held update)."""
        return Reader([(h.detach(), c.detach()) for h, c in self.hidden], detach_all(self.fast), detach_all(self.rule_state))


def truncate(reader: Reader, theta0: Params, last_stats: dict | None = None) -> Reader:
    """Meta-training's truncation: everything detached, and the last chunk's update held back
    (last_stats: the stats chunk_step returned for that chunk with meta=True) for `replay_held`."""
    held = None
    if (last_stats or {}).get("held") is not None:
        fast, grads, rule_state, loss, active = last_stats["held"]
        held = HeldUpdate({k: (w - theta0[k]).detach() for k, w in fast.items()}, detach_all(grads),
                          detach_all(rule_state), loss.detach(), active.detach())
    return Reader([(h.detach(), c.detach()) for h, c in reader.hidden], detach_all(reader.fast),
                  detach_all(reader.rule_state), held)


def replay_held(reader: Reader, rule: Rule, theta0: Params) -> Reader:
    """Recompute the held update in the current graph: reader.fast and reader.rule_state again
    (exactly so for the rule state, up to rounding for the weights, when the learner and theta0
    have not changed since), now functions of the learner's parameters and theta0."""
    h = reader.held
    if h is None:
        return reader
    before = {k: theta0[k] + d for k, d in h.drift.items()}
    fast, rule_state, _ = rule.update(before, h.grads, theta0, h.rule_state, h.loss)
    if not bool(h.active.all()):  # as in _chunk_step: padding rows keep their weights
        fast = {k: torch.where(h.active.view(-1, *([1] * (w.dim() - 1))), w, before[k]) for k, w in fast.items()}
    return Reader(reader.hidden, fast, rule_state)


def start_reader(lm: LSTMLM, theta0: Params, rule: Rule, names: list[str], batch: int, device,
                 dtype: torch.dtype | None = None) -> Reader:
    """`batch` fresh streams: fast weights `names` copied from theta0, a zero hidden state of `dtype`
    (default: theta0's), fresh rule state."""
    # materialised (not a stride-0 expand): every later update is a dense tensor of the same layout
    fast = {k: theta0[k].detach().expand(batch, *theta0[k].shape).clone() for k in names} if rule.adapts else {}
    dtype = dtype or next(iter(theta0.values())).dtype
    return Reader(lm.init_state(batch, device=device, dtype=dtype), fast, rule.init_state(fast) if fast else {})


def as_dtype(state: State, dtype: torch.dtype) -> State:
    """The hidden state in `dtype`: autocast (bf16) leaves it in bf16, the next step wants the weights'."""
    return [(h.to(dtype), c.to(dtype)) for h, c in state]


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
