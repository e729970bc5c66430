"""Krause et al.'s dynamic evaluation, "RMS with global decay prior" (Krause et al. 2018,
github.com/benkrause/dynamic-evaluation)."""
from __future__ import annotations

import torch

from ..progress import progress
from .base import LazyRows, Rule

GRAD_STATS = ("batch", "stream")


class DynEvalRule(Rule):
    """dW = lamb * decrate * (theta0 - theta) - lr * g / (MS + eps),
    decrate = MS / (mean over tensors of mean(MS)), clipped at 1 / lamb; MS = RMS segment gradient
    over training data (see compute_grad_rms).

    Per tensor, the pull a = lamb * decrate and the step size c = lr / (MS + eps) are computed once,
    so an update is two fused passes over the weights: lerp(theta, theta0, a), then - c * g.
    An input-only embedding is updated sparsely (sparse_rows, see base.LazyRows): a row that gets
    no gradient for n updates decays in closed form, theta0 + (1 - a)^n (theta - theta0)."""
    name = "dyneval"
    sparse_rows = True

    def __init__(self, ms: dict[str, torch.Tensor], lr: float, lamb: float, eps: float):
        super().__init__()
        self.lr, self.lamb, self.eps = lr, lamb, eps
        self.ms = dict(ms)
        # Krause's normaliser: the mean over tensors of each tensor's mean MS (not over coordinates)
        mean = torch.stack([m.mean() for m in ms.values()]).mean()
        # clipped at 1 / lamb so that the pull lamb * decrate stays <= 1; lamb = 0: no pull towards theta0
        self.decrate = {k: (m / mean).clamp(max=1 / lamb) if lamb > 0 else m / mean for k, m in ms.items()}
        self.pull = {k: lamb * d for k, d in self.decrate.items()}  # a, in [0, 1]
        self.step = {k: lr / (m + eps) for k, m in ms.items()}  # c
        self._log_keep: dict[str, torch.Tensor] = {}  # log(1 - a) of the lazily decayed weights

    def _apply(self, fn, recurse=True):
        """`.to(device)` / `.double()` move the per-tensor coefficients too (plain dicts keyed by weight
        names, which may contain dots, so not buffers)."""
        super()._apply(fn, recurse)
        for table in (self.ms, self.decrate, self.pull, self.step, self._log_keep):
            for k, v in table.items():
                table[k] = fn(v)
        return self

    def log_keep(self, name: str) -> torch.Tensor:
        if name not in self._log_keep:  # -inf (a = 1) clamped, so that n = 0 gives a factor of exactly 1
            self._log_keep[name] = torch.log1p(-self.pull[name]).clamp(min=-1e30)
        return self._log_keep[name]

    def init_state(self, fast):
        return LazyRows.init_state(fast)  # the sparse path's counters (left at zero on the dense path)

    def update(self, fast, grads, theta0, state, loss, rows=None):
        new = {}
        for k, w in fast.items():
            a, c = self.pull[k], self.step[k]
            if rows and k in rows:  # a block of rows (B, R, ...): their own coefficients
                a, c = a[rows[k]], c[rows[k]]
            # w + a (theta0 - w) - c g; the first pass allocates the result, the second writes into it
            new[k] = torch.lerp(w, theta0[k], a).addcmul_(c, grads[k], value=-1)
        return new, state, {}

    def decay_rows(self, name, w, theta0, rows, n):
        log_keep = self.log_keep(name) if rows is None else self.log_keep(name)[rows]  # (R, ...)
        n = n.view(*n.shape, *[1] * (log_keep.dim() - 1)).to(log_keep.dtype)  # (B, R, 1...)
        return torch.lerp(theta0, w, (n * log_keep).exp_())  # theta0 + (1 - a)^n (w - theta0)


def compute_grad_rms(lm, params, layout, names: list[str], n_chunks: int, device,
                     boundary: str = "reset", stat: str = "stream") -> dict[str, torch.Tensor]:
    """MS: root-mean-square, over training segments, of a segment's gradient, for each weight in
    `names`; layout: the training text as B streams cut into segments; n_chunks: segments (chunks
    of the layout) read, <= 0 for all of them.

    stat="batch": Krause et al.'s gradstat, dyneval's MS (`rule.grad_stat`). A segment is one chunk
    of all B streams, read with the shared weights (the fused kernels apply); its gradient is that of
    the mean loss over the chunk's B x T tokens. Reading is continuous as his: the hidden state is
    carried (detached) from chunk to chunk and never reset, whatever `boundary` says; build the
    layout with pad_articles=False, as his batchified training text.

    stat="stream": a segment is one stream's chunk; its gradient is that of the stream's own mean
    loss, taken with per-stream weights exactly as chunk_step does (about sqrt(B) larger than the
    batch statistic); boundary="reset" zeroes the hidden state of streams that start an article.
    Meta-training's EWC Fisher uses this one.
    """
    from ..reader import reset_rows  # local: the reader imports the rules package

    if stat not in GRAD_STATS:
        raise ValueError(f"gradient statistic {stat!r}; valid: {', '.join(GRAD_STATS)}")
    sq = {k: torch.zeros_like(params[k]) for k in names}  # running sum of squared segment gradients
    dtype = params[names[0]].dtype
    state = lm.init_state(layout.n_streams, device=device, dtype=dtype)
    n_segments = 0
    total = len(layout) if n_chunks <= 0 else min(n_chunks, len(layout))
    for i in progress(range(total), desc=f"gradient RMS ({stat})", leave=False):
        chunk = layout.chunk(i).to(device)
        if stat == "batch":
            weights = {k: v.detach().requires_grad_(k in names) for k, v in params.items()}
            with torch.enable_grad():
                out, state = lm.hidden(weights, chunk.inputs, state)
                n_tokens = chunk.mask.sum()
                loss = (lm.nll(weights, out, chunk.targets) * chunk.mask).sum() / n_tokens.clamp(min=1)
                # an adaptive softmax cluster no target falls in gets no gradient: a zero one
                grads = torch.autograd.grad(loss, [weights[k] for k in names], allow_unused=True)
            if bool(n_tokens > 0):
                for k, g in zip(names, grads):
                    if g is not None:
                        sq[k].addcmul_(g, g)
                n_segments += 1
        else:
            if boundary == "reset":
                state = reset_rows(state, chunk.new_article)
            batch = chunk.inputs.shape[0]
            fast = {k: params[k].detach().expand(batch, *params[k].shape).requires_grad_() for k in names}  # (B, ...)
            weights = {**params, **fast}
            with torch.enable_grad():
                out, state = lm.hidden(weights, chunk.inputs, state)
                nll = lm.nll(weights, out, chunk.targets) * chunk.mask  # (B, T)
                loss = nll.sum(1) / chunk.mask.sum(1).clamp(min=1)  # (B,) each stream's own mean loss
                grads = torch.autograd.grad(loss.sum(), list(fast.values()), allow_unused=True)  # (B, ...) each
            active = chunk.mask.any(1)  # (B,) streams that still have tokens; exhausted ones add nothing
            for k, g in zip(names, grads):
                if g is not None:
                    sq[k] += g[active].pow(2).sum(0)
            n_segments += int(active.sum())
        state = [(h.detach(), c.detach()) for h, c in state]
    if n_segments == 0:
        raise ValueError("no training segments to compute the gradient RMS from")
    return {k: (v / n_segments).sqrt() for k, v in sq.items()}
