"""Krause et al.'s dynamic evaluation, "RMS with global decay prior"."""
from __future__ import annotations

import torch

from .base import Rule


class DynEvalRule(Rule):
    """dW = lamb * decrate * (theta0 - theta) - lr * g / (MS + eps),
    decrate = MS / mean(MS), clipped at 1 / lamb; MS = RMS gradient over training data."""
    name = "dyneval"

    def __init__(self, ms: dict[str, torch.Tensor], lr: float, lamb: float, eps: float):
        super().__init__()
        self.lr, self.lamb, self.eps = lr, lamb, eps
        self.ms = ms
        mean = torch.cat([m.flatten() for m in ms.values()]).mean()  # global over all adapted weights
        self.decrate = {k: (m / mean).clamp(max=1 / lamb) for k, m in ms.items()}

    def update(self, fast, grads, theta0, state, loss):
        new = {k: w + self.lamb * self.decrate[k] * (theta0[k] - w) - self.lr * grads[k] / (self.ms[k] + self.eps)
               for k, w in fast.items()}
        return new, state, {}


def compute_grad_rms(lm, params, layout, names: list[str], n_chunks: int, device) -> dict[str, torch.Tensor]:
    """MS: root-mean-square over training chunks of the gradient of each chunk's mean loss."""
    from ..unroll import reset_rows  # local: the unroll imports the rules package

    sq = {k: torch.zeros_like(params[k]) for k in names}
    state = lm.init_state(layout.n_streams, device=device)
    n = 0
    for i in range(min(n_chunks, len(layout))):
        chunk = layout.chunk(i).to(device)
        state = reset_rows(state, chunk.new_article)
        p = {k: v.detach().requires_grad_(k in names) for k, v in params.items()}
        out, state = lm.hidden(p, chunk.inputs, state)
        loss = (lm.nll(p, out, chunk.targets) * chunk.mask).sum() / chunk.mask.sum().clamp(min=1)
        grads = torch.autograd.grad(loss, [p[k] for k in names])
        for k, g in zip(names, grads):
            sq[k] += g.pow(2)
        state = [(h.detach(), c.detach()) for h, c in state]
        n += 1
    return {k: (v / max(n, 1)).sqrt() for k, v in sq.items()}
