"""The meta-learner: a small network shared by every weight coordinate that rewrites the
LSTM weights while reading (the medium-term memory of Wolf, Chaumond & Delangue 2018).

Per coordinate it sees the gradient, its preconditioned form (gradient over the running
RMS of past gradients), the weight and its drift from theta0, plus the chunk loss per
stream, and outputs a forget gate f and an input gate i:

    theta' = theta0 + f * (theta - theta0) - i * step,      step = clip(g / sqrt(v))

f = 1 keeps (COPY), f -> 0 falls back to the static weight (FLUSH), i * step moves (UPDATE).

Variants (rule.learner, rule.learner_hidden):
- `ff`, hidden 0 (default): the gates are a sigmoid of a linear function of the features,
  like the meta-learner cells of Ravi & Larochelle and of the paper. It costs a handful
  of passes over the weights, which matters: the rule runs on B copies of every weight.
- `rnn`, hidden 0: the same with the previous gates as extra features (the paper's
  recurrent meta-learner); the gates are the per-coordinate recurrent state.
- `ff`, hidden > 0: an MLP over the features; `rnn`, hidden > 0: a GRU cell with a hidden
  state per coordinate. More expressive, several times slower (see `dynlm bench`).

Per-tensor normalisation (learned_optimization style) is folded into the first layer:
each feature is divided by its RMS over the stream's tensor, so one network serves tensors
of any scale, and for hidden 0 the division costs nothing per coordinate.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .base import Rule

COORD_FEATURES = ("grad", "precond", "drift", "weight")  # per coordinate, RMS-normalised per tensor
RECURRENT_FEATURES = ("prev_forget", "prev_input")  # rnn, hidden 0: the previous gates
BETA2 = 0.99  # decay of the running second moment of the gradient
EPS = 1e-8
COMPILE_MIN = 1 << 20  # coordinates (over all streams) from which a compiled update pays off


def _inv_rms(x: Tensor) -> Tensor:
    """1 / RMS of each stream's tensor: (B, n) -> (B, 1)."""
    return torch.linalg.vector_norm(x, dim=1, keepdim=True).div(math.sqrt(x.shape[1])).clamp(min=1e-12).reciprocal()


def preconditioned_step(g: Tensor, v: Tensor, t: Tensor, max_step: float) -> tuple[Tensor, Tensor]:
    """Running second moment and the bounded step g / sqrt(v), as in Adam. g, v (B, n); t (B,)."""
    v = torch.lerp(v, g * g, 1 - BETA2)
    debias = (1 - BETA2 ** t).unsqueeze(1)  # (B, 1)
    return (g * torch.rsqrt(v / debias + EPS ** 2)).clamp(-max_step, max_step), v


def linear_gated_update(w: Tensor, g: Tensor, v: Tensor, theta0: Tensor, t: Tensor, coef: Tensor, bias: Tensor,
                        lr: Tensor, max_step: float, prev_f: Tensor | None = None, prev_i: Tensor | None = None):
    """The hidden-0 learner on one tensor, written elementwise so torch.compile fuses it into one pass.

    w, g, v (B, n); theta0 (n,); t (B,); coef (F, 2) over COORD_FEATURES (+ RECURRENT_FEATURES);
    bias (B, 2). Returns new weights, v, forget gate, input gate, each (B, n)."""
    step, v = preconditioned_step(g, v, t, max_step)
    drift = w - theta0
    # per-tensor RMS normalisation, folded into per-stream coefficients: (B, F, 2)
    one = torch.ones_like(t).unsqueeze(1)
    scale = torch.cat([_inv_rms(g), one, _inv_rms(drift), _inv_rms(w)] + [one, one] * (prev_f is not None), dim=1)
    c = scale.unsqueeze(2) * coef
    feats = [g, step, drift, w] + ([prev_f, prev_i] if prev_f is not None else [])
    logit_f, logit_i = bias[:, 0:1], bias[:, 1:2]
    for j, x in enumerate(feats):
        logit_f = logit_f + c[:, j, 0:1] * x
        logit_i = logit_i + c[:, j, 1:2] * x
    f, i = torch.sigmoid(logit_f), torch.sigmoid(logit_i)
    return theta0 + f * drift - (2 * lr) * i * step, v, f, i


class LearnedRule(Rule):
    name = "learned"

    def __init__(self, names: list[str], kind: str = "ff", hidden: int = 0, forget_bias: float = 5.0,
                 init_lr: float = 3e-4, max_step: float = 3.0):
        super().__init__()
        if kind not in ("ff", "rnn"):
            raise ValueError(f"rule.learner must be 'ff' or 'rnn', got {kind!r}")
        if hidden < 0:
            raise ValueError(f"rule.learner_hidden must be >= 0, got {hidden}")
        self.names, self.kind, self.hidden, self.max_step = list(names), kind, hidden, max_step
        self.recurrent_gates = kind == "rnn" and hidden == 0
        n_in = len(COORD_FEATURES) + (len(RECURRENT_FEATURES) if self.recurrent_gates else 0)
        self.n_in = n_in
        if hidden == 0:
            self.coef = nn.Parameter(torch.zeros(n_in, 2))  # features -> (forget, input) logits
        elif kind == "ff":
            self.body = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh())
            self.head = nn.Linear(hidden, 2)
        else:
            self.body = nn.GRUCell(n_in, hidden)
            self.head = nn.Linear(hidden, 2)
        if hidden:
            with torch.no_grad():
                self.head.weight.mul_(0.01)
                self.head.bias.zero_()
        # an untrained learner keeps the weights (forget ~ 1) and takes small preconditioned steps
        self.gate_bias = nn.Parameter(torch.tensor([[forget_bias, 0.0]]).repeat(len(names), 1))  # per tensor
        self.loss_coef = nn.Parameter(torch.zeros(2))  # the chunk's surprise shifts both gates
        self.log_lr = nn.Parameter(torch.full((len(names),), math.log(init_lr)))  # step size per tensor
        self._compiled = None

    def compile(self) -> "LearnedRule":
        """Fuse the hidden-0 update into one pass over the weights with torch.compile, for tensors of
        at least COMPILE_MIN coordinates (eager makes ~20 passes over B copies of every weight;
        small tensors are not worth the compile time)."""
        if self.hidden == 0:
            # a few variants get compiled (eval vs meta, ff vs rnn, first steps): room for all of them
            dynamo = torch._dynamo.config
            limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
            setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
            self._compiled = torch.compile(linear_gated_update, dynamic=True)
        return self

    def _linear(self, w, *args):
        if self._compiled is not None and w.numel() >= COMPILE_MIN:
            try:
                return self._compiled(w, *args)
            except Exception as e:  # no C++ compiler, unsupported backend...: stay correct, just slower
                warnings.warn(f"torch.compile of the learned rule failed ({type(e).__name__}: {e}); running eager")
                self._compiled = None
        return linear_gated_update(w, *args)

    def init_state(self, fast):
        state = {}
        for k, w in fast.items():
            state[f"v.{k}"] = torch.zeros_like(w)
            if self.recurrent_gates:
                state[f"f.{k}"] = torch.ones_like(w)
                state[f"i.{k}"] = torch.zeros_like(w)
            elif self.kind == "rnn":
                state[f"h.{k}"] = w.new_zeros(*w.shape, self.hidden)
        first = next(iter(fast.values()))
        state["t"] = first.new_zeros(first.shape[0])  # (B,) updates so far
        return state

    def update(self, fast, grads, theta0, state, loss):
        t = state["t"] + 1  # (B,)
        B = t.shape[0]
        new_fast, new_state, f_means, i_means = {}, {"t": t}, [], []
        bias_shift = (loss.view(B, 1) / 10) * self.loss_coef  # (B, 2): the chunk's surprise shifts both gates
        for j, k in enumerate(self.names):
            shape = fast[k].shape
            w, g, v = (x.reshape(B, -1) for x in (fast[k], grads[k], state[f"v.{k}"]))  # (B, n)
            theta = theta0[k].reshape(-1)  # (n,)
            bias = self.gate_bias[j] + bias_shift  # (B, 2)
            lr = self.log_lr[j].exp()
            if self.hidden == 0:
                prev = (state[f"f.{k}"].reshape(B, -1), state[f"i.{k}"].reshape(B, -1)) if self.recurrent_gates else ()
                new, v, f, i = self._linear(w, g, v, theta, t, self.coef, bias, lr, self.max_step, *prev)
                if self.recurrent_gates:
                    new_state[f"f.{k}"], new_state[f"i.{k}"] = f.view(shape), i.view(shape)
            else:
                step, v = preconditioned_step(g, v, t, self.max_step)
                drift = w - theta
                x = torch.stack([g * _inv_rms(g), step, drift * _inv_rms(drift), w * _inv_rms(w)], dim=-1)  # (B, n, F)
                if self.kind == "ff":
                    logits = self.head(self.body(x)) + bias.unsqueeze(1)  # (B, n, 2)
                else:
                    h = self.body(x.reshape(-1, self.n_in), state[f"h.{k}"].reshape(-1, self.hidden))
                    new_state[f"h.{k}"] = h.view(*shape, self.hidden)
                    logits = self.head(h).view(B, -1, 2) + bias.unsqueeze(1)
                f, i = torch.sigmoid(logits[..., 0]), torch.sigmoid(logits[..., 1])
                new = theta + f * drift - (2 * lr) * i * step
            new_fast[k], new_state[f"v.{k}"] = new.view(shape), v.view(shape)
            f_means.append(f.detach().mean())
            i_means.append(2 * lr.detach() * i.detach().mean())
        stats = {"forget": torch.stack(f_means).mean(), "input": torch.stack(i_means).mean()}
        return new_fast, new_state, stats
