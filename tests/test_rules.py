"""Update rules and the unrolled meta-gradient, on tiny float64 models."""
import pytest
import torch

from dynlm.config import ModelConfig, RuleConfig
from dynlm.data.streams import Chunk
from dynlm.model import LSTMLM
from dynlm.rules import DynEvalRule, LearnedRule, SGDRule, make_rule
from dynlm.rules.base import Rule
from dynlm.rules.learned import preconditioned_step
from dynlm.reader import start_reader
from dynlm.unroll import chunk_step


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def tiny_lm():
    lm = LSTMLM(ModelConfig(emb_size=6, hidden_size=5, n_layers=1, dropout_input=0, dropout_hidden=0,
                            dropout_output=0), 13)
    return lm, lm.init_params(seed=1, dtype=torch.float64)


def chunks(n, B=2, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        tok = torch.randint(0, 13, (B, T + 1), generator=g)
        out.append(Chunk(tok[:, :-1], tok[:, 1:], torch.ones(B, T, dtype=torch.bool),
                         torch.zeros(B, dtype=torch.bool), torch.zeros(B, T, dtype=torch.long),
                         torch.arange(T).expand(B, T)))
    return out


def test_dyneval_matches_krause_formula_by_hand():
    theta0 = {"w": torch.tensor([1.0, 2.0, 3.0])}
    fast = {"w": torch.tensor([[1.5, 2.0, 2.0]])}
    grads = {"w": torch.tensor([[0.1, -0.2, 0.3]])}
    ms = {"w": torch.tensor([0.1, 0.2, 0.6])}  # mean(MS) = 0.3
    lr, lamb, eps = 0.01, 0.5, 1e-3
    new, _, _ = DynEvalRule(ms, lr, lamb, eps).update(fast, grads, theta0, {}, torch.zeros(1))
    decrate = torch.tensor([0.1 / 0.3, 0.2 / 0.3, min(0.6 / 0.3, 1 / lamb)])  # 2.0 clipped at 1/lamb = 2.0
    expected = fast["w"] + lamb * decrate * (theta0["w"] - fast["w"]) - lr * grads["w"] / (ms["w"] + eps)
    torch.testing.assert_close(new["w"], expected)
    # hand-computed first coordinate: 1.5 + 0.5*(1/3)*(-0.5) - 0.01*0.1/0.101
    assert new["w"][0, 0].item() == pytest.approx(1.5 - 0.5 / 6 - 0.001 / 0.101)


def test_sgd_rule_unrolled_equals_torch_optim_sgd():
    lm, p = tiny_lm()
    names = lm.lstm_names()
    rule = SGDRule(lr=0.3)
    data = chunks(3, B=1)
    reader = start_reader(lm, p, rule, names, 1, "cpu")
    ref = {k: p[k].clone().requires_grad_() for k in names}
    opt = torch.optim.SGD(ref.values(), lr=0.3)
    hidden = lm.init_state(1, dtype=torch.float64)
    for c in data:
        nll, reader, _ = chunk_step(lm, p, p, rule, reader, c)
        out, hidden = lm.hidden({**p, **ref}, c.inputs, [(h.detach(), s.detach()) for h, s in hidden])
        loss = lm.nll({**p, **ref}, out, c.targets).mean()
        torch.testing.assert_close(nll.sum() / nll.numel(), loss.detach())  # prequential: scored before the step
        opt.zero_grad(); loss.backward(); opt.step()
    for k in names:
        torch.testing.assert_close(reader.fast[k][0], ref[k].detach())


def unrolled_loss(lm, p, rule, theta0, data, second_order, checkpoint=False):
    reader = start_reader(lm, theta0, rule, list(theta0), data[0].inputs.shape[0], "cpu")
    total = 0
    for c in data:
        nll, reader, _ = chunk_step(lm, {**p, **theta0}, theta0, rule, reader, c, meta=True, second_order=second_order,
                                    checkpoint=checkpoint)
        total = total + nll.sum()
    return total / sum(c.mask.sum() for c in data)


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("kind,hidden", [("ff", 0), ("rnn", 0), ("ff", 4), ("rnn", 4)])
def test_meta_gradient_matches_finite_differences(second_order, kind, hidden):
    torch.manual_seed(0)  # the perturbation and the checked coordinates: not whatever earlier tests left
    lm, p = tiny_lm()
    names = lm.lstm_names()
    theta0 = {k: p[k].clone() for k in names}
    rule = LearnedRule(names, kind=kind, hidden=hidden, init_lr=0.05)
    with torch.no_grad():
        for q in rule.parameters():
            q.add_(0.3 * torch.randn_like(q))  # away from the init's near-zero head
    data = chunks(3)
    loss = unrolled_loss(lm, p, rule, theta0, data, second_order)
    params = list(rule.parameters())
    grads = torch.autograd.grad(loss, params)
    # first order treats the inner gradient as a constant: finite differences must do the same,
    # so compare against a loss whose inner gradients come from a fixed (unperturbed) trajectory
    frozen = Replaying(rule)
    unrolled_loss(lm, p, frozen, theta0, data, False)  # records it
    eps = 1e-6
    for q, g in zip(params, grads):
        idx = tuple(torch.randint(0, s, ()).item() for s in q.shape)
        with torch.no_grad():
            q[idx] += eps
        up = fd_loss(lm, p, rule, theta0, data, second_order, frozen)
        with torch.no_grad():
            q[idx] -= 2 * eps
        down = fd_loss(lm, p, rule, theta0, data, second_order, frozen)
        with torch.no_grad():
            q[idx] += eps
        assert g[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("kind,hidden", [("ff", 0), ("rnn", 0), ("rnn", 4)])
def test_checkpointed_unroll_gives_the_same_meta_gradients(kind, hidden, second_order):
    torch.manual_seed(0)
    lm, p = tiny_lm()
    names = lm.lstm_names()
    theta0 = {k: p[k].clone().requires_grad_() for k in names}
    rule = LearnedRule(names, kind=kind, hidden=hidden, init_lr=0.05)
    with torch.no_grad():
        for q in rule.parameters():
            q.add_(0.3 * torch.randn_like(q))
    data = chunks(3)
    wrt = list(rule.parameters()) + list(theta0.values())
    plain = torch.autograd.grad(unrolled_loss(lm, p, rule, theta0, data, second_order), wrt)
    ckpt = torch.autograd.grad(unrolled_loss(lm, p, rule, theta0, data, second_order, checkpoint=True), wrt)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(a.abs().max() > 0 for a in plain)
    if second_order:  # and the second-order terms are really there: first order gives other gradients
        first = torch.autograd.grad(unrolled_loss(lm, p, rule, theta0, data, False), wrt)
        assert max((a - b).abs().max() for a, b in zip(first, ckpt)) > 1e-8


class Replaying(Rule):
    """`rule` given the inner gradients and chunk losses it was given on a recorded pass instead of
    the current ones: the first-order objective (each step's gradient input a constant), which the
    finite differences of a first-order meta-gradient must take. The first pass records."""

    def __init__(self, rule):
        super().__init__()
        self.rule, self.recorded, self.replaying = rule, [], None

    def init_state(self, fast):
        return self.rule.init_state(fast)

    def update(self, fast, grads, theta0, state, loss, rows=None):
        if self.replaying is None:
            self.recorded.append((grads, loss))
        else:
            grads, loss = next(self.replaying)
        return self.rule.update(fast, grads, theta0, state, loss)

    def replay(self) -> "Replaying":
        self.replaying = iter(self.recorded)
        return self


def fd_loss(lm, p, rule, theta0, data, second_order, frozen):
    with torch.enable_grad():
        if second_order:
            return unrolled_loss(lm, p, rule, theta0, data, True).item()
        # first order: replay with the inner gradients of the unperturbed trajectory held fixed
        return unrolled_loss(lm, p, frozen.replay(), theta0, data, False).item()


def test_no_gradient_flows_past_truncation():
    lm, p = tiny_lm()
    names = lm.lstm_names()
    theta0 = {k: p[k].clone() for k in names}
    rule = LearnedRule(names, hidden=4, init_lr=0.05)
    data = chunks(2)
    reader = start_reader(lm, theta0, rule, names, 2, "cpu")
    _, reader, _ = chunk_step(lm, {**p, **theta0}, theta0, rule, reader, data[0], meta=True)
    reader = reader.detached()
    nll, _, _ = chunk_step(lm, {**p, **theta0}, theta0, rule, reader, data[1], meta=True)
    grads = torch.autograd.grad(nll.sum(), list(rule.parameters()), allow_unused=True)
    # the second chunk is scored with weights from before truncation: nothing reaches the learner
    assert all(g is None or g.abs().max() == 0 for g in grads)


def test_untrained_learner_is_nearly_harmless():
    lm, p = tiny_lm()
    names = lm.lstm_names()
    rule = make_rule("learned", RuleConfig(), names)
    reader = start_reader(lm, p, rule, names, 2, "cpu")
    for c in chunks(3):
        _, reader, stats = chunk_step(lm, p, p, rule, reader, c)
    drift = max((reader.fast[k] - p[k]).abs().max().item() for k in names)
    assert 0 < drift < 0.01 and stats["forget"] > 0.99


def test_dyneval_decay_is_normalised_by_the_mean_of_tensor_means():
    # Krause's gsum: the average over tensors of each tensor's mean MS, not over all coordinates
    ms = {"a": torch.tensor([0.1, 0.3]), "b": torch.tensor([0.6, 0.6, 0.6, 0.6])}  # tensor means 0.2, 0.6
    rule = DynEvalRule(ms, lr=0.0, lamb=0.1, eps=1e-3)
    torch.testing.assert_close(rule.decrate["a"], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(rule.decrate["b"], torch.full((4,), 1.5))  # coordinate mean 0.4667 would give 1.29


def test_grad_rms_is_the_rms_of_each_segments_own_gradient():
    import numpy as np
    from dynlm.data.articles import Article
    from dynlm.data.streams import StreamLayout
    from dynlm.rules import compute_grad_rms

    lm, p = tiny_lm()
    names = lm.lstm_names()
    rng = np.random.default_rng(0)
    articles = [Article(f"a{i}", "", rng.integers(1, 13, n).astype(np.int32), n) for i, n in enumerate([17, 9, 12])]
    layout = StreamLayout(articles, 2, 4, 0)
    ms = compute_grad_rms(lm, p, layout, names, n_chunks=100, device="cpu")
    # by hand: read each stream alone with shared weights; one gradient per (stream, chunk) segment
    sq, n = {k: torch.zeros_like(p[k]) for k in names}, 0
    for s in range(layout.n_streams):
        state = lm.init_state(1, dtype=torch.float64)
        for c in layout:
            if c.new_article[s]:
                state = lm.init_state(1, dtype=torch.float64)
            mask = c.mask[s:s + 1]
            w = {k: v.clone().requires_grad_(k in names) for k, v in p.items()}
            out, state = lm.hidden(w, c.inputs[s:s + 1], state)
            state = [(h.detach(), cc.detach()) for h, cc in state]
            if not mask.any():
                continue
            loss = (lm.nll(w, out, c.targets[s:s + 1]) * mask).sum() / mask.sum()
            for k, g in zip(names, torch.autograd.grad(loss, [w[k] for k in names])):
                sq[k] += g.pow(2)
            n += 1
    for k in names:
        torch.testing.assert_close(ms[k], (sq[k] / n).sqrt())
    # the old statistic, the gradient of the loss averaged over all streams, is measurably smaller
    old, state = {k: torch.zeros_like(p[k]) for k in names}, lm.init_state(2, dtype=torch.float64)
    for c in layout:
        w = {k: v.clone().requires_grad_(k in names) for k, v in p.items()}
        out, state = lm.hidden(w, c.inputs, [(h * ~c.new_article[:, None], cc * ~c.new_article[:, None]) for h, cc in state])
        state = [(h.detach(), cc.detach()) for h, cc in state]
        loss = (lm.nll(w, out, c.targets) * c.mask).sum() / c.mask.sum()
        for k, g in zip(names, torch.autograd.grad(loss, [w[k] for k in names])):
            old[k] += g.pow(2) / len(layout)
    assert sum(ms[k].pow(2).sum() for k in names) > 1.2 * sum(old[k].sum() for k in names)


def test_dyneval_on_all_weights_adapts_each_streams_own_embeddings_and_softmax():
    from dynlm.rules import adapted_names
    lm, p = tiny_lm()
    names = adapted_names(lm, RuleConfig(dyneval_weights="all"), "dyneval", p)
    assert set(names) == set(p) and adapted_names(lm, RuleConfig(), "dyneval", p) == names  # Krause: the default
    assert adapted_names(lm, RuleConfig(), "dyneval", p, "lstm") == lm.lstm_names()  # dyneval@lstm
    assert adapted_names(lm, RuleConfig(), "learned", p) == lm.lstm_names()  # the learned rule: LSTM by default
    ms = {k: torch.rand_like(p[k]) + 0.1 for k in names}
    rule = DynEvalRule(ms, lr=0.05, lamb=0.01, eps=1e-3)
    steps = chunks(3, B=2)

    def read(stream_rows):  # stream_rows of every chunk, read together; returns nll per chunk
        reader, nlls = start_reader(lm, p, rule, names, len(stream_rows), "cpu"), []
        for c in steps:
            sub = Chunk(*(getattr(c, f)[stream_rows] for f in Chunk.__dataclass_fields__))
            nll, reader, _ = chunk_step(lm, p, p, rule, reader, sub)
            nlls.append(nll)
        return torch.cat(nlls, 1), reader

    both, reader = read([0, 1])
    assert reader.fast["embed"].shape == (2, *p["embed"].shape)  # a copy per stream
    assert not torch.equal(reader.fast["embed"][0], p["embed"]) and not torch.equal(reader.fast["out_bias"][0], p["out_bias"])
    for s in range(2):  # each stream alone reads exactly as it does beside the other
        alone, _ = read([s])
        torch.testing.assert_close(both[s], alone[0])
    reader_lstm = start_reader(lm, p, rule, lm.lstm_names(), 2, "cpu")
    nlls = []
    for c in steps:
        nll, reader_lstm, _ = chunk_step(lm, p, p, rule, reader_lstm, c)
        nlls.append(nll)
    assert (torch.cat(nlls, 1) - both)[:, 4:].abs().max() > 1e-6  # the embeddings/softmax updates matter


def test_adam_control_is_the_learned_family_with_constant_gates():
    """`adam`: theta' = theta0 + (1 - decay)(theta - theta0) - lr * clip(g / sqrt(v)), v Adam's debiased
    second moment: by hand over three updates, per stream."""
    torch.manual_seed(0)
    theta0 = {"w": torch.randn(4, 3, dtype=torch.float64)}
    rule = make_rule("adam", RuleConfig(adam_lr=0.01, adam_decay=0.1, max_step=3.0), ["w"])
    fast = {"w": theta0["w"].expand(2, 4, 3).clone()}
    state = rule.init_state(fast)
    w, v = fast["w"].clone(), torch.zeros(2, 4, 3, dtype=torch.float64)
    for t in range(1, 4):
        g = torch.randn(2, 4, 3, dtype=torch.float64)
        fast, state, _ = rule.update(fast, {"w": g}, theta0, state, torch.zeros(2))
        v_before, v = v, 0.99 * v + 0.01 * g * g
        step = (g / torch.sqrt(v / (1 - 0.99 ** t) + 1e-16)).clamp(-3, 3)
        # the learned rule's step, from the same inputs: the control is its family
        learned_step, _ = preconditioned_step(g.reshape(2, -1), v_before.reshape(2, -1),
                                              torch.full((2,), float(t), dtype=torch.float64), 3.0)
        torch.testing.assert_close(learned_step.view_as(step), step, rtol=1e-12, atol=1e-14)
        w = theta0["w"] + 0.9 * (w - theta0["w"]) - 0.01 * step
        assert torch.allclose(fast["w"], w, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(fast["w"][0], fast["w"][1])  # each stream its own statistics


def test_dyneval_without_decay_is_rms_normalised_sgd():
    """lamb = 0 (a tuning grid's lower bound): no pull towards theta0, only the step -lr g / (MS + eps)."""
    theta0 = {"w": torch.tensor([1.0, 2.0, 3.0])}
    fast = {"w": torch.tensor([[1.5, 2.0, 2.0]])}
    grads = {"w": torch.tensor([[0.1, -0.2, 0.3]])}
    ms = {"w": torch.tensor([0.1, 0.2, 0.6])}
    new, _, _ = DynEvalRule(ms, 0.01, 0.0, 1e-3).update(fast, grads, theta0, {}, torch.zeros(1))
    torch.testing.assert_close(new["w"], fast["w"] - 0.01 * grads["w"] / (ms["w"] + 1e-3))


def test_dyneval_coefficients_move_with_the_rule():
    """`.to()` moves Krause's per-tensor coefficients too (they live in dicts keyed by weight names)."""
    from dynlm.rules import DynEvalRule
    rule = DynEvalRule({"lstm.w_hh0": torch.full((4, 3), 0.5)}, lr=1e-3, lamb=1e-2, eps=1e-4)
    rule.log_keep("lstm.w_hh0")
    rule.double()
    assert all(t["lstm.w_hh0"].dtype == torch.float64
               for t in (rule.ms, rule.decrate, rule.pull, rule.step, rule._log_keep))


def test_checkpointed_unroll_with_the_compiled_update_gives_the_same_meta_gradients(monkeypatch):
    """A compiled (fused) update inside a checkpointed chunk step crashed the backward pass
    ("target_frame.early_stop is set"): checkpointed steps run the update eager, forward and
    recomputation alike, and give the plain unroll's meta-gradients."""
    import dynlm.rules.learned as learned
    monkeypatch.setattr(learned, "COMPILE_MIN", 1)  # the tiny model's tensors take the compiled path
    torch.manual_seed(0)
    lm, p = tiny_lm()
    names = lm.lstm_names()
    theta0 = {k: p[k].clone().requires_grad_() for k in names}
    rule = LearnedRule(names, init_lr=0.05).fused()
    data = chunks(3)
    wrt = list(rule.parameters())
    plain = torch.autograd.grad(unrolled_loss(lm, p, rule, theta0, data, False), wrt)
    if rule._compiled is None:
        pytest.skip("torch.compile is not available here (the rule fell back to eager)")
    ckpt = torch.autograd.grad(unrolled_loss(lm, p, rule, theta0, data, False, checkpoint=True), wrt)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert rule._compiled is not None  # compiled again once the checkpointed steps are done
