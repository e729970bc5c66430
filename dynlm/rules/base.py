"""One interface for every way of changing the LSTM weights while reading.

`fast` holds the adapted weights with a leading stream dimension (B, ...); `theta0`
the static starting weights (...). Rules are pure: they return new dicts and never
write in place, so the same code serves meta-training (differentiable) and evaluation.
"""
from __future__ import annotations

from torch import Tensor, nn

Params = dict[str, Tensor]
RuleState = dict[str, Tensor]


class Rule(nn.Module):
    name = "rule"
    adapts = True  # False: no inner gradient is needed at all

    def init_state(self, fast: Params) -> RuleState:
        return {}

    def update(self, fast: Params, grads: Params, theta0: Params, state: RuleState, loss: Tensor) -> tuple[Params, RuleState, dict]:
        """loss (B,): the chunk's mean NLL per stream. Returns new weights, new state, stats."""
        raise NotImplementedError


class StaticRule(Rule):
    name = "static"
    adapts = False

    def update(self, fast, grads, theta0, state, loss):
        return fast, state, {}


class SGDRule(Rule):
    """Plain dynamic evaluation: one SGD step on each chunk's loss."""
    name = "sgd"

    def __init__(self, lr: float):
        super().__init__()
        self.lr = lr

    def update(self, fast, grads, theta0, state, loss):
        return {k: w - self.lr * grads[k] for k, w in fast.items()}, state, {}
