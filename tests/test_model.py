import pytest
import torch
from torch import nn

from dynlm.config import ModelConfig
from dynlm.model import LSTMLM, lstm_layer_loop
from dynlm.model.per_stream_lstm import per_stream_lstm


def tiny(softmax="full", **kw):
    cfg = ModelConfig(emb_size=8, hidden_size=16, n_layers=2, softmax=softmax, adaptive_cutoffs=[10, 30],
                      dropout_input=0, dropout_hidden=0, dropout_output=0, **kw)
    lm = LSTMLM(cfg, 50)
    return lm, lm.init_params(seed=0, dtype=torch.float64)


def per_stream(lm, params, batch, names=None):
    out = dict(params)
    for n in lm.lstm_names() if names is None else names:
        out[n] = params[n].expand(batch, *params[n].shape).clone()
    return out


def test_matches_torch_nn_lstm():
    lm, p = tiny()
    ref = nn.LSTM(8, 16, num_layers=2, batch_first=True).double()
    with torch.no_grad():
        for l in range(2):
            getattr(ref, f"weight_ih_l{l}").copy_(p[f"lstm.{l}.w_ih"])
            getattr(ref, f"weight_hh_l{l}").copy_(p[f"lstm.{l}.w_hh"])
            getattr(ref, f"bias_ih_l{l}").copy_(p[f"lstm.{l}.b"])
            getattr(ref, f"bias_hh_l{l}").zero_()
    tokens = torch.randint(0, 50, (3, 9))
    out, state = lm.hidden(p, tokens, lm.init_state(3, dtype=torch.float64))
    ref_out, (h, c) = ref(torch.nn.functional.embedding(tokens, p["embed"]))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(state[1][0], h[1])
    torch.testing.assert_close(state[1][1], c[1])


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_per_stream_weights_equal_shared(softmax):
    lm, p = tiny(softmax)
    tokens = torch.randint(0, 50, (4, 7))
    s0 = lm.init_state(4, dtype=torch.float64)
    out, _ = lm.hidden(p, tokens, s0)
    out_ps, _ = lm.hidden(per_stream(lm, p, 4), tokens, s0)
    torch.testing.assert_close(out, out_ps)
    torch.testing.assert_close(lm.nll(p, out, tokens), lm.nll(p, out_ps, tokens))


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_per_stream_embeddings_and_softmax_equal_shared_and_stay_independent(softmax):
    lm, p = tiny(softmax)  # full: tied embedding with a projection, all per stream
    tokens = torch.randint(0, 50, (3, 7))
    s0 = lm.init_state(3, dtype=torch.float64)
    ps = per_stream(lm, p, 3, names=list(p))  # every weight, embeddings and softmax included
    assert lm.per_stream_output(ps) and not lm.per_stream_output(per_stream(lm, p, 3))
    out, _ = lm.hidden(p, tokens, s0)
    out_ps, _ = lm.hidden(ps, tokens, s0)
    torch.testing.assert_close(out_ps, out)
    torch.testing.assert_close(lm.nll(ps, out_ps, tokens), lm.nll(p, out, tokens))
    # stream 1's own copy of the input embedding and of the softmax moves stream 1 only
    out_name = "adaptive.head.weight" if softmax == "adaptive" else "out_bias"
    for name in ("embed", out_name):
        changed = {**ps, name: ps[name].clone()}
        changed[name][1] += 0.3 * torch.randn_like(changed[name][1])  # not a constant: softmax-invariant
        out_c, _ = lm.hidden(changed, tokens, s0)
        nll_c = lm.nll(changed, out_c, tokens)
        torch.testing.assert_close(nll_c[[0, 2]], lm.nll(p, out, tokens)[[0, 2]])
        assert (nll_c[1] - lm.nll(p, out, tokens)[1]).abs().max() > 1e-4


def test_per_stream_gradients_of_every_weight_are_each_streams_own():
    lm, p = tiny("adaptive")
    tokens = torch.randint(0, 50, (2, 6))
    ps = {k: v.requires_grad_() for k, v in per_stream(lm, p, 2, names=list(p)).items()}
    out, _ = lm.hidden(ps, tokens, lm.init_state(2, dtype=torch.float64))
    grads = torch.autograd.grad(lm.nll(ps, out, tokens).sum(), list(ps.values()))
    for b in range(2):  # stream b's slice = the gradient of stream b's loss alone, with shared weights
        w = {k: v.clone().requires_grad_() for k, v in p.items()}
        out_b, _ = lm.hidden(w, tokens[b:b + 1], lm.init_state(1, dtype=torch.float64))
        # (the shared adaptive softmax skips a tail cluster none of the targets falls in: no gradient)
        ref = torch.autograd.grad(lm.nll(w, out_b, tokens[b:b + 1]).sum(), list(w.values()), allow_unused=True)
        for name, g, r in zip(ps, grads, ref):
            torch.testing.assert_close(g[b], torch.zeros_like(g[b]) if r is None else r, msg=name)


def test_per_stream_weights_are_independent():
    lm, p = tiny()
    ps = per_stream(lm, p, 2)
    ps["lstm.0.w_hh"] = ps["lstm.0.w_hh"].clone()
    ps["lstm.0.w_hh"][1] += 0.5  # change stream 1's weights only
    tokens = torch.randint(0, 50, (1, 6)).expand(2, 6)
    out, _ = lm.hidden(ps, tokens, lm.init_state(2, dtype=torch.float64))
    ref, _ = lm.hidden(p, tokens[:1], lm.init_state(1, dtype=torch.float64))
    torch.testing.assert_close(out[0], ref[0])
    assert (out[1] - ref[0]).abs().max() > 1e-3


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_log_probs_agree_with_nll(softmax):
    lm, p = tiny(softmax)
    tokens = torch.randint(0, 50, (2, 5))
    out, _ = lm.hidden(p, tokens, lm.init_state(2, dtype=torch.float64))
    lp = lm.log_probs(p, out)  # (B, T, V)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))
    torch.testing.assert_close(-lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), lm.nll(p, out, tokens))


def test_double_backward_through_per_stream_weights():
    lm, p = tiny()
    ps = {k: v.requires_grad_() for k, v in per_stream(lm, p, 2).items()}
    tokens = torch.randint(0, 50, (2, 5))
    out, _ = lm.hidden(ps, tokens, lm.init_state(2, dtype=torch.float64), double_backward=True)
    loss = lm.nll(ps, out, tokens).mean()
    (g,) = torch.autograd.grad(loss, ps["lstm.0.w_hh"], create_graph=True)
    (gg,) = torch.autograd.grad((g ** 2).sum(), ps["lstm.1.w_ih"])
    assert gg.abs().sum() > 0 and torch.isfinite(gg).all()


def test_loop_layer_matches_fused_layer():
    lm, p = tiny()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    s = (torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64))
    a, (ha, ca) = lstm_layer_loop(x, s, p["lstm.0.w_ih"], p["lstm.0.w_hh"], p["lstm.0.b"])
    b, (hb, cb) = lm._layer_fused(x, s, p["lstm.0.w_ih"], p["lstm.0.w_hh"], p["lstm.0.b"])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ca, cb)


def test_per_stream_backward_matches_autograd_loop():
    # the hand-written backward against autograd through the plain loop, all inputs, float64
    torch.manual_seed(0)
    B, T, I, H = 3, 7, 5, 4
    args = [torch.randn(B, T, I), torch.randn(B, H), torch.randn(B, H), torch.randn(B, 4 * H, I),
            torch.randn(B, 4 * H, H), torch.randn(B, 4 * H)]
    args = [a.double().requires_grad_() for a in args]
    out_a, (h_a, c_a) = per_stream_lstm(args[0], (args[1], args[2]), *args[3:])
    out_b, (h_b, c_b) = lstm_layer_loop(args[0], (args[1], args[2]), *args[3:])
    torch.testing.assert_close(out_a, out_b)
    # a loss that uses the outputs and both final states
    w = torch.randn_like(out_a), torch.randn_like(h_a), torch.randn_like(c_a)
    grads_a = torch.autograd.grad((out_a * w[0]).sum() + (h_a * w[1]).sum() + (c_a * w[2]).sum(), args)
    grads_b = torch.autograd.grad((out_b * w[0]).sum() + (h_b * w[1]).sum() + (c_b * w[2]).sum(), args)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb)
    assert torch.autograd.gradcheck(lambda *a: per_stream_lstm(a[0], (a[1], a[2]), *a[3:])[0],
                                    [a.detach()[:, :3].clone().requires_grad_() if a.dim() == 3 and a.shape[1] == T
                                     else a.detach().clone().requires_grad_() for a in args])


def test_dropout_only_in_training():
    cfg = ModelConfig(emb_size=8, hidden_size=8, dropout_emb=0.5, dropout_input=0.5, weight_drop=0.5)
    lm = LSTMLM(cfg, 30)
    p = lm.init_params()
    tokens = torch.randint(0, 30, (2, 4))
    a, _ = lm.hidden(p, tokens, lm.init_state(2))
    b, _ = lm.hidden(p, tokens, lm.init_state(2))
    c, _ = lm.hidden(p, tokens, lm.init_state(2), train=True)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_one_stream_takes_the_shared_kernels_with_the_same_values_and_gradients(softmax):
    """B = 1 (Krause's protocol): per-stream weights of every kind go through the fused LSTM and the
    shared softmax; NLLs and every weight's gradient equal those of the general per-stream path (B = 2,
    the same stream twice)."""
    lm, p = tiny(softmax)
    tokens = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    one = {k: v.requires_grad_() for k, v in per_stream(lm, p, 1, names=list(p)).items()}
    two = {k: v.requires_grad_() for k, v in per_stream(lm, p, 2, names=list(p)).items()}
    nll1 = lm.nll(one, lm.hidden(one, tokens, lm.init_state(1, dtype=torch.float64))[0], tokens)  # (1, T)
    tok2 = tokens.expand(2, -1)
    nll2 = lm.nll(two, lm.hidden(two, tok2, lm.init_state(2, dtype=torch.float64))[0], tok2)  # (2, T)
    assert torch.allclose(nll1[0], nll2[0], rtol=1e-10) and torch.allclose(nll2[0], nll2[1])
    g1 = torch.autograd.grad(nll1.sum(), list(one.values()))
    g2 = torch.autograd.grad(nll2[0].sum(), list(two.values()))
    for k, a, b in zip(one, g1, g2):
        assert torch.allclose(a[0], b[0], rtol=1e-8, atol=1e-12), k
