"""An LSTM language model written as a function of a parameter dictionary.

Any set of weights can be substituted, including one copy per stream of any weight (a
leading batch dimension B): that is how the medium-term memory (fast weights rewritten
while reading) plugs in. The learned rule rewrites the LSTM weights; dynamic evaluation
may rewrite the embeddings and the softmax too. Shared LSTM weights take the fused
`nn.LSTM` kernel; per-stream ones take a hand-written batched kernel, or an explicit
loop that supports double backward (cuDNN's fused RNN does not). Per-stream output
weights score every token with the full (B, T, V) log-distribution of its own stream.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..config import ModelConfig
from .per_stream_lstm import per_stream_lstm
from .regularizers import embedding_dropout, locked_dropout

Params = dict[str, Tensor]
State = list[tuple[Tensor, Tensor]]  # per layer: (h, c), each (B, H)


class LSTMLM:
    """Holds the architecture; the weights always come in as `params`."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.sizes = [cfg.hidden_size] * cfg.n_layers  # output size of each layer
        self.inputs = [cfg.emb_size] + self.sizes[:-1]
        self.adaptive = cfg.softmax == "adaptive"
        if cfg.softmax not in ("full", "adaptive"):
            raise ValueError(f"model.softmax must be 'full' or 'adaptive', got {cfg.softmax!r}")
        if self.adaptive:
            cutoffs = [c for c in cfg.adaptive_cutoffs if 0 < c < vocab_size - 1] or [max(1, vocab_size // 2)]
            # a template on the meta device: functional_call swaps in the real weights
            self._adaptive = nn.AdaptiveLogSoftmaxWithLoss(
                cfg.hidden_size, vocab_size, cutoffs, div_value=4.0, device="meta"
            )
        self._fused = {}  # (in, hidden) -> nn.LSTM template for the shared-weight path
        self.fuse_single_stream = True  # B = 1 per-stream weights take the shared kernels (cost.py counts ops: off)

    # ---- parameters -------------------------------------------------------------
    def init_params(self, seed: int = 0, device="cpu", dtype=torch.float32) -> Params:
        g = torch.Generator().manual_seed(seed)
        r = self.cfg.init_range

        def uniform(*shape, bound):
            return (torch.rand(*shape, generator=g) * 2 - 1) * bound

        p: Params = {"embed": uniform(self.vocab_size, self.cfg.emb_size, bound=r)}
        for l, (n_in, n_h) in enumerate(zip(self.inputs, self.sizes)):
            k = 1 / math.sqrt(n_h)
            p[f"lstm.{l}.w_ih"] = uniform(4 * n_h, n_in, bound=k)
            p[f"lstm.{l}.w_hh"] = uniform(4 * n_h, n_h, bound=k)
            p[f"lstm.{l}.b"] = uniform(4 * n_h, bound=k)
        if self.adaptive:
            ref = nn.AdaptiveLogSoftmaxWithLoss(
                self.cfg.hidden_size, self.vocab_size, self._adaptive.cutoffs[:-1], div_value=4.0
            )
            for name, t in ref.named_parameters():
                p[f"adaptive.{name}"] = uniform(*t.shape, bound=1 / math.sqrt(max(1, t.shape[-1])))
        else:
            if self.cfg.hidden_size != self.cfg.emb_size:  # project to the tied embedding size
                p["proj"] = uniform(self.cfg.emb_size, self.cfg.hidden_size, bound=1 / math.sqrt(self.cfg.hidden_size))
            p["out_bias"] = torch.zeros(self.vocab_size)
        return {k: v.to(device=device, dtype=dtype) for k, v in p.items()}

    def lstm_names(self, layers: list[int] | None = None) -> list[str]:
        layers = range(self.cfg.n_layers) if layers is None else layers
        return [f"lstm.{l}.{w}" for l in layers for w in ("w_ih", "w_hh", "b")]

    def init_state(self, batch: int, device="cpu", dtype=torch.float32) -> State:
        return [(torch.zeros(batch, h, device=device, dtype=dtype),) * 2 for h in self.sizes]

    # ---- forward ----------------------------------------------------------------
    def hidden(self, params: Params, tokens: Tensor, state: State, *, train: bool = False,
               double_backward: bool = False) -> tuple[Tensor, State]:
        """tokens (B, T) -> top-layer outputs (B, T, H) and the new state.

        double_backward: the caller will differentiate through the gradient (second-order
        meta-training), so per-stream layers must take the plain autograd loop."""
        c = self.cfg
        embed = embedding_dropout(params["embed"], c.dropout_emb if train else 0.0)
        if embed.dim() == 3:  # (B, V, E): each stream looks its tokens up in its own copy
            x = embed[torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1), tokens]  # (B, T, E)
        else:
            x = F.embedding(tokens, embed)  # (B, T, E)
        x = locked_dropout(x, c.dropout_input, train)
        new_state = []
        for l in range(c.n_layers):
            w_ih, w_hh, b = (params[f"lstm.{l}.{w}"] for w in ("w_ih", "w_hh", "b"))
            if train and c.weight_drop > 0:
                w_hh = F.dropout(w_hh, c.weight_drop, training=True)  # DropConnect, per forward
            x, s = self._layer(x, state[l], w_ih, w_hh, b, double_backward)
            new_state.append(s)
            x = locked_dropout(x, c.dropout_output if l == c.n_layers - 1 else c.dropout_hidden, train)
        return x, new_state

    def _layer(self, x, state, w_ih, w_hh, b, double_backward=False):
        if w_ih.dim() == 2 and w_hh.dim() == 2 and b.dim() == 1:
            return self._layer_fused(x, state, w_ih, w_hh, b)
        if self.fuse_single_stream and x.shape[0] == 1 and not double_backward and w_ih.dim() == 3 and w_hh.dim() == 3 and b.dim() == 2:
            # one stream (Krause's protocol): its own weights are just weights, so the fused kernel applies
            return self._layer_fused(x, state, w_ih.squeeze(0), w_hh.squeeze(0), b.squeeze(0))
        # the hand-written backward needs every weight per stream and one dtype (no autocast)
        if (not double_backward and w_ih.dim() == 3 and w_hh.dim() == 3 and b.dim() == 2
                and not torch.is_autocast_enabled(x.device.type)):
            return per_stream_lstm(x, state, w_ih, w_hh, b)
        return lstm_layer_loop(x, state, w_ih, w_hh, b)

    def _layer_fused(self, x, state, w_ih, w_hh, b):
        n_h = w_hh.shape[1]
        key = (w_ih.shape[1], n_h)
        if key not in self._fused:
            self._fused[key] = nn.LSTM(key[0], n_h, batch_first=True, device="meta")
        weights = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b, "bias_hh_l0": torch.zeros_like(b)}
        h0, c0 = state
        args = (x, (h0.unsqueeze(0), c0.unsqueeze(0)))
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU autocast sends nn.LSTM to oneDNN's bf16 LSTM, which CPUs without bf16 instructions lack
            # ("could not create a primitive descriptor"): there it runs in the weights' float32
            with torch.autocast("cpu", enabled=False):
                out, (h, c) = functional_call(self._fused[key], weights, _args_to(args, w_ih.dtype))
        else:
            out, (h, c) = functional_call(self._fused[key], weights, args)
        return out, (h.squeeze(0), c.squeeze(0))

    def nll(self, params: Params, out: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood (B, T) of `targets` (B, T)."""
        if self.per_stream_output(params):
            if out.shape[0] == 1 and self.fuse_single_stream:  # one stream: its own weights take the shared kernels
                return self.nll(self._first_stream(params), out, targets)
            # no shared kernel: each stream's own full distribution
            return -self.log_probs(params, out).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        flat, tgt = out.reshape(-1, out.shape[-1]), targets.reshape(-1)
        if self.adaptive:
            sub = {k[len("adaptive."):]: v for k, v in params.items() if k.startswith("adaptive.")}
            # outside autocast, in float32: under CUDA autocast its index_copy_ meets two dtypes and fails
            with torch.autocast(flat.device.type, enabled=False):
                logp = functional_call(self._adaptive, sub, (_upcast(flat), tgt)).output  # (N,)
            return (-logp).view_as(targets)
        logits = self._logits(params, flat)
        return F.cross_entropy(_upcast(logits), tgt, reduction="none").view_as(targets)

    def log_probs(self, params: Params, out: Tensor) -> Tensor:
        """Full next-token log-distribution (..., V); used by the neural cache."""
        if not self.adaptive:
            return F.log_softmax(_upcast(self._logits(params, out)), dim=-1)
        a = self._adaptive
        head = _linear(out, params["adaptive.head.weight"], params.get("adaptive.head.bias"))
        head = F.log_softmax(_upcast(head), dim=-1)
        parts = [head[..., : a.shortlist_size]]
        for i in range(a.n_clusters):
            h = _linear(out, params[f"adaptive.tail.{i}.0.weight"])
            h = _linear(h, params[f"adaptive.tail.{i}.1.weight"])
            parts.append(head[..., a.shortlist_size + i, None] + F.log_softmax(_upcast(h), dim=-1))
        return torch.cat(parts, dim=-1)

    def _first_stream(self, params: Params) -> Params:
        """The output weights of a single stream (B = 1) without their stream dimension."""
        names = [k for k in params if k.startswith("adaptive.")] if self.adaptive else ["embed", "proj", "out_bias"]
        return {**params, **{k: params[k].squeeze(0) for k in names
                             if k in params and params[k].dim() > (1 if k.endswith("bias") else 2)}}

    def per_stream_output(self, params: Params) -> bool:
        """Whether any softmax weight comes with a leading stream dimension."""
        names = [k for k in params if k.startswith("adaptive.")] if self.adaptive else ["embed", "proj", "out_bias"]
        return any(k in params and params[k].dim() > (1 if k.endswith("bias") else 2) for k in names)

    def _logits(self, params, out):
        if "proj" in params:
            out = _linear(out, params["proj"])
        return _linear(out, params["embed"], params["out_bias"])  # tied: the embedding is the softmax


def _upcast(x: Tensor) -> Tensor:
    """Softmax in at least float32 (bf16 logits lose the tail), float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _bmm_or_mm(x: Tensor, w: Tensor) -> Tensor:
    """x (B, ..., in) times w (out, in) shared, or w (B, out, in) per stream."""
    if w.dim() == 2:
        return x @ w.t()
    return (x.reshape(x.shape[0], -1, x.shape[-1]) @ w.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[1])


def _linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear with a shared w (out, in) / b (out,), or per-stream w (B, out, in) / b (B, out);
    x (B, ..., in)."""
    y = F.linear(x, w) if w.dim() == 2 else _bmm_or_mm(x, w)
    if b is None:
        return y
    return y + (b if b.dim() == 1 else b.view(b.shape[0], *([1] * (y.dim() - 2)), b.shape[-1]))


def _args_to(args, dtype: torch.dtype):
    """(x, (h, c)) in `dtype`."""
    x, (h, c) = args
    return x.to(dtype), (h.to(dtype), c.to(dtype))


def lstm_layer_loop(x: Tensor, state, w_ih: Tensor, w_hh: Tensor, b: Tensor):
    """One LSTM layer with possibly per-stream weights, as plain differentiable ops."""
    h, c = state  # (B, H)
    bias = b if b.dim() == 1 else b.unsqueeze(1)  # (4H,) or (B, 1, 4H)
    xw = _bmm_or_mm(x, w_ih) + bias  # (B, T, 4H): all input projections in one matmul
    outs = []
    for t in range(x.shape[1]):
        gates = xw[:, t] + _bmm_or_mm(h, w_hh)  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1), (h, c)  # (B, T, H)
