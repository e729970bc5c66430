"""Krause et al.'s dynamic evaluation, "RMS with global decay prior"."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .base import Rule


class DynEvalRule(Rule):
    """dW = lamb * decrate * (theta0 - theta) - lr * g / (MS + eps),
    decrate = MS / (mean over tensors of mean(MS)), clipped at 1 / lamb; MS = RMS per-segment gradient
    over training data (see compute_grad_rms)."""
    name = "dyneval"

    def __init__(self, ms: dict[str, torch.Tensor], lr: float, lamb: float, eps: float):
        super().__init__()
        self.lr, self.lamb, self.eps = lr, lamb, eps
        self.ms = ms
        # Krause's normaliser: the mean over tensors of each tensor's mean MS (not over coordinates)
        mean = torch.stack([m.mean() for m in ms.values()]).mean()
        self.decrate = {k: (m / mean).clamp(max=1 / lamb) for k, m in ms.items()}

    def update(self, fast, grads, theta0, state, loss):
        new = {k: w + self.lamb * self.decrate[k] * (theta0[k] - w) - self.lr * grads[k] / (self.ms[k] + self.eps)
               for k, w in fast.items()}
        return new, state, {}


def compute_grad_rms(lm, params, layout, names: list[str], n_chunks: int, device,
                     boundary: str = "reset") -> dict[str, torch.Tensor]:
    """MS: root-mean-square, over training segments, of each segment's own gradient.

    A segment is one stream's chunk; its gradient is that of the stream's own mean loss, taken with
    per-stream weights exactly as chunk_step does, so MS has the scale of the gradients the rule
    divides by MS (a gradient averaged over B streams would be up to sqrt(B) smaller). Krause's
    gradstat averaged over a batch of 100 segments instead; see `dynlm tune` for the grid this implies.
    """
    from ..unroll import reset_rows  # local: the unroll imports the rules package

    sq = {k: torch.zeros_like(params[k]) for k in names}  # running sum of squared per-segment gradients
    dtype = params[names[0]].dtype
    state = lm.init_state(layout.n_streams, device=device, dtype=dtype)
    n_segments = 0
    for i in tqdm(range(min(n_chunks, len(layout))), desc="gradient RMS", leave=False, mininterval=2):
        chunk = layout.chunk(i).to(device)
        if boundary == "reset":
            state = reset_rows(state, chunk.new_article)
        batch = chunk.inputs.shape[0]
        fast = {k: params[k].detach().expand(batch, *params[k].shape).requires_grad_() for k in names}  # (B, ...)
        weights = {**params, **fast}
        with torch.enable_grad():
            out, state = lm.hidden(weights, chunk.inputs, state)
            nll = lm.nll(weights, out, chunk.targets) * chunk.mask  # (B, T)
            loss = nll.sum(1) / chunk.mask.sum(1).clamp(min=1)  # (B,) each stream's own mean loss
            grads = torch.autograd.grad(loss.sum(), list(fast.values()))  # each (B, ...): stream b's gradient
        active = chunk.mask.any(1)  # (B,) streams that still have tokens; exhausted ones add nothing
        for k, g in zip(names, grads):
            sq[k] += g[active].pow(2).sum(0)
        n_segments += int(active.sum())
        state = [(h.detach(), c.detach()) for h, c in state]
    if n_segments == 0:
        raise ValueError("no training segments to compute the gradient RMS from")
    return {k: (v / n_segments).sqrt() for k, v in sq.items()}
