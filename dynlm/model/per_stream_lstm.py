"""One LSTM layer whose weights differ per stream (the adapted fast weights), with a
hand-written backward.

Per-stream weights cannot use the fused cuDNN / oneDNN kernel, and plain autograd over a
time loop is slow: it materialises and accumulates a (B, 4H, H) weight gradient at every
time step, which is memory-bound. This backward keeps only the (B, T, 4H) gate gradients
during the reverse loop and forms each weight gradient with one batched matmul at the end.

Its backward is not itself differentiable (no double backward): second-order meta-training
takes the plain autograd loop (`lstm_layer_loop`) instead.
"""
from __future__ import annotations

import torch
from torch import Tensor


class PerStreamLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor):
        # x (B, T, I); h0, c0 (B, H); w_ih (B, 4H, I); w_hh (B, 4H, H); b (B, 4H)
        B, T, _ = x.shape
        H = w_hh.shape[2]
        xw = torch.baddbmm(b.unsqueeze(1), x, w_ih.transpose(1, 2))  # (B, T, 4H): all input projections at once
        hs = x.new_empty(B, T + 1, H)  # h_{t-1} for every step, then h_T
        cs = x.new_empty(B, T + 1, H)
        acts = x.new_empty(B, T, 4 * H)  # gate activations i, f, g, o
        hs[:, 0], cs[:, 0] = h0, c0
        w_hh_t = w_hh.transpose(1, 2)  # (B, H, 4H), a view
        for t in range(T):
            gates = torch.baddbmm(xw[:, t : t + 1], hs[:, t : t + 1], w_hh_t).squeeze(1)  # (B, 4H)
            a = acts[:, t]
            a[:, : 2 * H] = torch.sigmoid(gates[:, : 2 * H])
            a[:, 2 * H : 3 * H] = torch.tanh(gates[:, 2 * H : 3 * H])
            a[:, 3 * H :] = torch.sigmoid(gates[:, 3 * H :])
            i, f, g, o = a.chunk(4, dim=1)
            cs[:, t + 1] = f * cs[:, t] + i * g
            hs[:, t + 1] = o * torch.tanh(cs[:, t + 1])
        ctx.save_for_backward(x, hs, cs, acts, w_ih, w_hh)
        out = hs[:, 1:]
        return out.clone(), hs[:, T].clone(), cs[:, T].clone()

    @staticmethod
    def backward(ctx, d_out: Tensor, d_hT: Tensor, d_cT: Tensor):
        x, hs, cs, acts, w_ih, w_hh = ctx.saved_tensors
        B, T, _ = x.shape
        H = w_hh.shape[2]
        dh = d_hT if d_hT is not None else x.new_zeros(B, H)
        dc = d_cT if d_cT is not None else x.new_zeros(B, H)
        d_gates = x.new_empty(B, T, 4 * H)  # gradient w.r.t. the gate pre-activations
        for t in reversed(range(T)):
            if d_out is not None:
                dh = dh + d_out[:, t]
            i, f, g, o = acts[:, t].chunk(4, dim=1)
            tanh_c = torch.tanh(cs[:, t + 1])
            dc = dc + dh * o * (1 - tanh_c * tanh_c)
            dg = d_gates[:, t]
            dg[:, :H] = dc * g * i * (1 - i)
            dg[:, H : 2 * H] = dc * cs[:, t] * f * (1 - f)
            dg[:, 2 * H : 3 * H] = dc * i * (1 - g * g)
            dg[:, 3 * H :] = dh * tanh_c * o * (1 - o)
            dc = dc * f
            dh = torch.bmm(dg.unsqueeze(1), w_hh).squeeze(1)  # (B, H)
        d_gates_t = d_gates.transpose(1, 2)  # (B, 4H, T)
        need = ctx.needs_input_grad
        d_x = torch.bmm(d_gates, w_ih) if need[0] else None  # (B, T, I)
        d_w_ih = torch.bmm(d_gates_t, x) if need[3] else None  # (B, 4H, I): one matmul over all steps
        d_w_hh = torch.bmm(d_gates_t, hs[:, :T]) if need[4] else None  # (B, 4H, H)
        d_b = d_gates.sum(1) if need[5] else None  # (B, 4H)
        return d_x, dh, dc, d_w_ih, d_w_hh, d_b


def per_stream_lstm(x: Tensor, state, w_ih: Tensor, w_hh: Tensor, b: Tensor):
    """x (B, T, I), weights with a leading stream dimension -> (B, T, H), (h, c)."""
    h0, c0 = state
    out, h, c = PerStreamLSTM.apply(x, h0, c0, w_ih, w_hh, b)
    return out, (h, c)
