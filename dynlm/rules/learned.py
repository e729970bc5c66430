"""The meta-learner: a small network shared by every weight coordinate that rewrites the
LSTM weights while reading (the medium-term memory of Wolf, Chaumond & Delangue 2018).

Per coordinate it sees features of the gradient, the weight and its drift from theta0 (see
FEATURE_SETS); per stream it also reads the chunk loss (the stream's mean NLL on the chunk, in nats)
scaled by 1/10, which shifts the biases of both gates (`bias_shift = loss / 10 * loss_coef` in
`update`). It outputs a forget gate f and an input gate i per coordinate:

    (logit_f, logit_i) = net(features) + gate_bias[tensor] + (loss / 10) * loss_coef
    f, i = sigmoid(logit_f), sigmoid(logit_i)
    theta' = theta0 + f * (theta - theta0) - 2 lr * i * step,      step = clip(g / sqrt(v))

net is linear in the features for hidden 0 (`coef`), else an MLP or a GRU cell (below); gate_bias
and lr = exp(log_lr) are learned per tensor, loss_coef is shared.

f = 1 keeps (COPY), f -> 0 falls back to the static weight (FLUSH), i * step moves (UPDATE).

Feature sets (rule.learner_features):
- `magnitude` (default): what a gate needs to decide per coordinate, independent of the sign of
  the update (g: gradient, d = theta - theta0: drift, s: step, rms(.): over the stream's tensor):
      log_grad      log(|g| / rms(g) + 1e-3)        is this coordinate's gradient large?
      abs_step      |s|                            the Adam-normalised step size (<= max_step)
      abs_drift     |d| / rms(d)                   how far it has already moved
      agree         -s * d / rms(d)                > 0: the step keeps pushing the way it drifted
      consolidation log(max(F, 1e-4))              F: per-coordinate importance (`consolidation`), else 0
- `signed` (the first version, kept for comparison and old checkpoints): g / rms(g), s,
  d / rms(d), theta / rms(theta). Gates linear in signed features cannot depend on
  magnitudes: in effect per-stream Adam with one step size per tensor and a constant decay.
The feature set of a learner state is told by its shapes (`features_of_state`): a state that
disagrees with rule.learner_features wins, so old checkpoints load and run as they were trained.

Variants (rule.learner, rule.learner_hidden):
- `ff`, hidden 0 (default): the gates are a sigmoid of a linear function of the features,
  like the meta-learner cells of Ravi & Larochelle and of the paper. It costs a handful
  of passes over the weights, which matters: the rule runs on B copies of every weight.
- `rnn`, hidden 0: the same with the previous gates as extra features (the paper's
  recurrent meta-learner); the gates are the per-coordinate recurrent state.
- `ff`, hidden > 0: an MLP over the features; `rnn`, hidden > 0: a GRU cell with a hidden
  state per coordinate. More expressive, several times slower (see `dynlm bench`).

Per-tensor normalisation (learned_optimization style) is folded into the first layer: for
hidden 0 the division by a tensor's RMS is a per-stream factor on a coefficient (and, for
log_grad, a per-stream shift of the bias), so it costs nothing per coordinate.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import Tensor, nn

from .base import Rule

FEATURE_SETS = {
    "signed": ("grad", "precond", "drift", "weight"),
    "magnitude": ("log_grad", "abs_step", "abs_drift", "agree", "consolidation"),
}
COORD_FEATURES = FEATURE_SETS["signed"]  # the first version's name for its features
RECURRENT_FEATURES = ("prev_forget", "prev_input")  # rnn, hidden 0: the previous gates
# a learner state's feature set is told by its input width, so the sets must differ in size
assert len({len(f) for f in FEATURE_SETS.values()}) == len(FEATURE_SETS)
BETA2 = 0.99  # decay of the running second moment of the gradient
EPS = 1e-8
LOG_GRAD_FLOOR = 1e-3  # log_grad = log(|g| / rms(g) + floor): a zero gradient reads log(1e-3) = -6.9
CONSOLIDATION_FLOOR = 1e-4  # consolidation = log(max(F, floor))
COMPILE_MIN = 1 << 20  # coordinates (over all streams) from which a compiled update pays off
# one process runs the update in many settings (evaluation, first- and second-order meta-training,
# checkpointed recomputation, the first steps): more guard sets than torch.compile's default limit (8)
# per function, past which it would quietly run the rest eager
RECOMPILE_LIMIT = 64


def _room_for_recompiles():
    """torch.compile's recompile limit raised to RECOMPILE_LIMIT for the duration of one call."""
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    return dynamo.patch({name: max(getattr(dynamo, name), RECOMPILE_LIMIT)})


def _inv_rms(x: Tensor) -> Tensor:
    """1 / RMS of each stream's tensor: (B, n) -> (B, 1)."""
    return torch.linalg.vector_norm(x, dim=1, keepdim=True).div(math.sqrt(x.shape[1])).clamp(min=1e-12).reciprocal()


def preconditioned_step(g: Tensor, v: Tensor, t: Tensor, max_step: float) -> tuple[Tensor, Tensor]:
    """Running second moment and the bounded step g / sqrt(v), as in Adam. g, v (B, n); t (B,)."""
    v = torch.lerp(v, g * g, 1 - BETA2)
    debias = (1 - BETA2 ** t).unsqueeze(1)  # (B, 1)
    return (g * torch.rsqrt(v / debias + EPS ** 2)).clamp(-max_step, max_step), v


def linear_gated_update(w: Tensor, g: Tensor, v: Tensor, theta0: Tensor, t: Tensor, coef: Tensor, bias: Tensor,
                        lr: Tensor, max_step: float, log_f: Tensor | None = None, prev_f: Tensor | None = None,
                        prev_i: Tensor | None = None):
    """The hidden-0 learner on `signed` features, written elementwise so torch.compile fuses it into one pass.

    w, g, v (B, n); theta0 (n,); t (B,); coef (F, 2) over FEATURE_SETS["signed"] (+ RECURRENT_FEATURES);
    bias (B, 2); log_f is not used (the signed set has no consolidation input).
    Returns new weights, v, forget gate, input gate, each (B, n)."""
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


def magnitude_gated_update(w: Tensor, g: Tensor, v: Tensor, theta0: Tensor, t: Tensor, coef: Tensor, bias: Tensor,
                           lr: Tensor, max_step: float, log_f: Tensor | None = None, prev_f: Tensor | None = None,
                           prev_i: Tensor | None = None):
    """The hidden-0 learner on `magnitude` features, elementwise like linear_gated_update.

    coef (F, 2) over FEATURE_SETS["magnitude"] (+ RECURRENT_FEATURES); log_f (n,) or None (F = 1).
    The RMS normalisations are per-stream factors on the coefficients; log_grad's -log rms(g) is a
    per-stream shift of the bias: log(|g|/r + a) = log(|g| + a r) - log r."""
    step, v = preconditioned_step(g, v, t, max_step)
    drift = w - theta0
    inv_g, inv_d = _inv_rms(g), _inv_rms(drift)  # (B, 1)
    one = torch.ones_like(inv_d)
    # per-stream coefficients (B, F, 2): abs_drift * 1/rms(d), agree * -1/rms(d)
    scale = torch.cat([one, one, inv_d, -inv_d, one] + [one, one] * (prev_f is not None), dim=1)
    c = scale.unsqueeze(2) * coef
    b = bias + torch.log(inv_g) * coef[0]  # (B, 2)
    feats = [torch.log(g.abs() + LOG_GRAD_FLOOR / inv_g), step.abs(), drift.abs(), step * drift, log_f]
    feats += [prev_f, prev_i] if prev_f is not None else []
    logit_f, logit_i = b[:, 0:1], b[:, 1:2]
    for j, x in enumerate(feats):
        if x is None:  # no consolidation weights: F = 1, log F = 0
            continue
        logit_f = logit_f + c[:, j, 0:1] * x
        logit_i = logit_i + c[:, j, 1:2] * x
    f, i = torch.sigmoid(logit_f), torch.sigmoid(logit_i)
    return theta0 + f * drift - (2 * lr) * i * step, v, f, i


GATED_UPDATES = {"signed": linear_gated_update, "magnitude": magnitude_gated_update}


def coordinate_features(features: str, w: Tensor, g: Tensor, step: Tensor, drift: Tensor,
                        log_f: Tensor | None) -> Tensor:
    """The normalised features, materialised for the hidden > 0 networks: (B, n, F)."""
    if features == "signed":
        return torch.stack([g * _inv_rms(g), step, drift * _inv_rms(drift), w * _inv_rms(w)], dim=-1)
    inv_d = _inv_rms(drift)
    cons = (log_f if log_f is not None else g.new_zeros(())).expand_as(g)
    return torch.stack([torch.log(g.abs() * _inv_rms(g) + LOG_GRAD_FLOOR), step.abs(), drift.abs() * inv_d,
                        -step * drift * inv_d, cons], dim=-1)


class LearnedRule(Rule):
    name = "learned"

    def __init__(self, names: list[str], kind: str = "ff", hidden: int = 0, forget_bias: float = 5.0,
                 init_lr: float = 3e-4, max_step: float = 3.0, features: str = "magnitude"):
        super().__init__()
        if kind not in ("ff", "rnn"):
            raise ValueError(f"rule.learner must be 'ff' or 'rnn', got {kind!r}")
        if hidden < 0:
            raise ValueError(f"rule.learner_hidden must be >= 0, got {hidden}")
        if features not in FEATURE_SETS:
            raise ValueError(f"rule.learner_features must be one of {', '.join(FEATURE_SETS)}, got {features!r}")
        self.names, self.kind, self.hidden, self.max_step = list(names), kind, hidden, max_step
        self.features = features
        self.recurrent_gates = kind == "rnn" and hidden == 0
        n_in = self._n_in(features)
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
        # per-coordinate consolidation weights F (name -> tensor shaped like theta0, e.g. a diagonal
        # Fisher normalised to mean 1), read by the `magnitude` features as log max(F, 1e-4); None: F = 1
        self.consolidation: dict[str, Tensor] | None = None
        self.record_gates = False  # True: stats["gates"][name] = (forget, input), per coordinate (B, ...)
        self._compiled = None

    def _n_in(self, features: str) -> int:
        return len(FEATURE_SETS[features]) + (len(RECURRENT_FEATURES) if self.recurrent_gates else 0)

    def features_of_state(self, state_dict) -> str | None:
        """The feature set a learner state was trained with, told by its input width; None if unknown."""
        key = {0: "coef"}.get(self.hidden, "body.0.weight" if self.kind == "ff" else "body.weight_ih")
        if key not in state_dict:
            return None
        width = state_dict[key].shape[0 if self.hidden == 0 else 1]
        return next((f for f in FEATURE_SETS if self._n_in(f) == width), None)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads states of either feature set: one of the other set switches the rule to it, resizing the
        input weights in place (an optimizer built over rule.parameters() keeps its parameters)."""
        found = self.features_of_state(state_dict)
        if found is not None and found != self.features:
            warnings.warn(f"learner state has {found!r} features; the rule was built with {self.features!r}: "
                          f"using {found!r}")
            self._switch_features(found)
        return super().load_state_dict(state_dict, strict, assign)

    def _switch_features(self, features: str) -> None:
        n_in = self._n_in(features)
        if self.hidden == 0:
            self.coef.data = self.coef.data.new_zeros(n_in, 2)
        elif self.kind == "ff":
            lin = self.body[0]
            lin.weight.data = lin.weight.data.new_zeros(lin.out_features, n_in)
            lin.in_features = n_in
        else:
            self.body.weight_ih.data = self.body.weight_ih.data.new_zeros(self.body.weight_ih.shape[0], n_in)
            self.body.input_size = n_in
        self.features, self.n_in = features, n_in

    def fused(self) -> "LearnedRule":
        """Fuse the hidden-0 update into one pass over the weights with torch.compile, for tensors of
        at least COMPILE_MIN coordinates (eager makes ~20 passes over B copies of every weight;
        small tensors are not worth the compile time). Not nn.Module.compile, which compiles forward."""
        if self.hidden == 0:
            self._compiled = {k: torch.compile(fn, dynamic=True) for k, fn in GATED_UPDATES.items()}
        return self

    @contextlib.contextmanager
    def eager(self):
        """The update without torch.compile for the duration (checkpointed meta-steps, see unroll.py)."""
        compiled, self._compiled = self._compiled, None
        try:
            yield
        finally:
            self._compiled = compiled

    def _linear(self, w, *args):
        if self._compiled is not None and w.numel() >= COMPILE_MIN:
            try:
                with _room_for_recompiles():
                    return self._compiled[self.features](w, *args)
            except Exception as e:  # no C++ compiler, unsupported backend...: stay correct, just slower
                warnings.warn(f"torch.compile of the learned rule failed ({type(e).__name__}: {e}); running eager")
                self._compiled = None
        return GATED_UPDATES[self.features](w, *args)

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

    def _log_consolidation(self, k: str, like: Tensor) -> Tensor | None:
        if self.features != "magnitude" or not self.consolidation or k not in self.consolidation:
            return None
        return self.consolidation[k].detach().reshape(-1).to(like).clamp(min=CONSOLIDATION_FLOOR).log()

    def update(self, fast, grads, theta0, state, loss, rows=None):  # rows: only for sparse_rows rules (not this one)
        t = state["t"] + 1  # (B,)
        B = t.shape[0]
        new_fast, new_state, f_means, i_means, gates = {}, {"t": t}, [], [], {}
        bias_shift = (loss.view(B, 1) / 10) * self.loss_coef  # (B, 2): the chunk's surprise shifts both gates
        for j, k in enumerate(self.names):
            shape = fast[k].shape
            w, g, v = (x.reshape(B, -1) for x in (fast[k], grads[k], state[f"v.{k}"]))  # (B, n)
            theta = theta0[k].reshape(-1)  # (n,)
            bias = self.gate_bias[j] + bias_shift  # (B, 2)
            lr = self.log_lr[j].exp()
            log_f = self._log_consolidation(k, w)
            if self.hidden == 0:
                prev = (state[f"f.{k}"].reshape(B, -1), state[f"i.{k}"].reshape(B, -1)) if self.recurrent_gates else ()
                new, v, f, i = self._linear(w, g, v, theta, t, self.coef, bias, lr, self.max_step, log_f, *prev)
                if self.recurrent_gates:
                    new_state[f"f.{k}"], new_state[f"i.{k}"] = f.view(shape), i.view(shape)
            else:
                step, v = preconditioned_step(g, v, t, self.max_step)
                drift = w - theta
                x = coordinate_features(self.features, w, g, step, drift, log_f)  # (B, n, F)
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
            if self.record_gates:
                gates[k] = (f.detach().view(shape), i.detach().view(shape))
        stats = {"forget": torch.stack(f_means).mean(), "input": torch.stack(i_means).mean()}
        if self.record_gates:
            stats["gates"] = gates
        return new_fast, new_state, stats
