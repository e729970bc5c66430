"""The meta-learner: a small network shared by every weight coordinate that rewrites the
LSTM weights while reading (the medium-term memory of Wolf, Chaumond & Delangue 2018).

Per coordinate it sees the gradient, running gradient moments, the weight, its drift from
theta0 and the chunk loss, each normalised per tensor and per stream, and outputs gates:

    theta' = theta0 + f * (theta - theta0) - i * step

f = 1 keeps (COPY), f -> 0 falls back to the static weight (FLUSH), i * step moves (UPDATE).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Rule

N_FEATURES = 6
BETA1, BETA2 = 0.9, 0.99  # running first / second gradient moments


def _rms_normalise(x: Tensor) -> Tensor:
    """Scale each stream's tensor to unit RMS: one network serves tensors of any scale. x (B, ...)."""
    dims = tuple(range(1, x.dim()))
    return x / (x.pow(2).mean(dim=dims, keepdim=True) + 1e-16).sqrt()


class LearnedRule(Rule):
    name = "learned"

    def __init__(self, names: list[str], kind: str = "ff", hidden: int = 8, forget_bias: float = 5.0,
                 init_lr: float = 3e-4, max_step: float = 3.0):
        super().__init__()
        if kind not in ("ff", "rnn"):
            raise ValueError(f"rule.learner must be 'ff' or 'rnn', got {kind!r}")
        self.names, self.kind, self.hidden, self.max_step = list(names), kind, hidden, max_step
        if kind == "ff":
            self.body = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh())
        else:
            self.body = nn.GRUCell(N_FEATURES, hidden)
        self.head = nn.Linear(hidden, 3)  # forget logit, input logit, step correction
        with torch.no_grad():  # an untrained learner: keep the weights, take small normalised-gradient steps
            self.head.weight.mul_(0.01)
            self.head.bias.copy_(torch.tensor([forget_bias, 0.0, 0.0]))
        self.log_lr = nn.Parameter(torch.full((len(names),), math.log(init_lr)))  # one step size per tensor

    def init_state(self, fast):
        state = {}
        for k, w in fast.items():
            state[f"m.{k}"] = torch.zeros_like(w)
            state[f"v.{k}"] = torch.zeros_like(w)
            if self.kind == "rnn":
                state[f"h.{k}"] = w.new_zeros(*w.shape, self.hidden)
        state["t"] = next(iter(fast.values())).new_zeros(next(iter(fast.values())).shape[0])  # (B,) updates so far
        return state

    def update(self, fast, grads, theta0, state, loss):
        t = state["t"] + 1  # (B,)
        new_fast, new_state, gates = {}, {"t": t}, []
        for j, k in enumerate(self.names):
            w, g = fast[k], grads[k]  # (B, ...)
            shape = (-1,) + (1,) * (w.dim() - 1)
            m = BETA1 * state[f"m.{k}"] + (1 - BETA1) * g
            v = BETA2 * state[f"v.{k}"] + (1 - BETA2) * g * g
            v_hat = v / (1 - BETA2 ** t).view(shape)  # bias-corrected, as in Adam
            precond = g / (v_hat.sqrt() + 1e-12)  # Adam-like direction, O(1) per coordinate
            drift = w - theta0[k]
            feats = torch.stack([
                _rms_normalise(g), _rms_normalise(m), precond.clamp(-5, 5), _rms_normalise(drift),
                _rms_normalise(w), (loss / 10).view(shape).expand_as(w),
            ], dim=-1)  # (B, ..., F)
            if self.kind == "ff":
                hid = self.body(feats)
            else:
                hid = self.body(feats.reshape(-1, N_FEATURES), state[f"h.{k}"].reshape(-1, self.hidden)).view(*w.shape, self.hidden)
                new_state[f"h.{k}"] = hid
            out = self.head(hid)  # (B, ..., 3)
            f = torch.sigmoid(out[..., 0])
            i = torch.exp(self.log_lr[j]) * 2 * torch.sigmoid(out[..., 1])
            step = self.max_step * torch.tanh((precond + out[..., 2]) / self.max_step)  # bounded
            new_fast[k] = theta0[k] + f * drift - i * step
            new_state[f"m.{k}"], new_state[f"v.{k}"] = m, v
            gates.append((f.detach().mean(), i.detach().mean()))
        stats = {"forget": torch.stack([a for a, _ in gates]).mean(), "input": torch.stack([b for _, b in gates]).mean()}
        return new_fast, new_state, stats
