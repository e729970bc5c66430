"""The truncated unroll of meta-training (unroll.TruncatedUnroll), on tiny float64 models: every
chunk read enters exactly one meta-loss term with weights that depend on the learner (at K=1 too),
the meta-gradient after a truncation is the finite difference of the meta-loss, no gradient
crosses a truncation, and checkpointing changes nothing."""
import copy

import numpy as np
import pytest
import torch

from dynlm.data.articles import Article
from dynlm.data.streams import Chunk, StreamLayout
from dynlm.rules import LearnedRule
from dynlm.reader import replay_held
from dynlm.unroll import Stepper, TruncatedUnroll

from test_rules import _float64, tiny_lm  # noqa: F401 (the autouse float64 fixture and the tiny model)

VOCAB = 13  # tiny_lm's vocabulary


def learner(names, kind="ff", hidden=0, seed=0):
    torch.manual_seed(seed)
    rule = LearnedRule(names, kind=kind, hidden=hidden, init_lr=0.05)
    with torch.no_grad():
        for q in rule.parameters():
            q.add_(0.3 * torch.randn_like(q))  # away from the init's near-zero head
    return rule


def random_chunks(n, B=2, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(0, VOCAB, (B, T + 1), generator=g)
        out.append(Chunk(tok[:, :-1], tok[:, 1:], torch.ones(B, T, dtype=torch.bool), torch.zeros(B, dtype=torch.bool),
                         torch.zeros(B, T, dtype=torch.long), torch.arange(T).expand(B, T)))
    return out


def layout(pad_articles):
    """Three streams of articles of uneven lengths: new articles mid-stream, padded chunks (reset)
    and a stream that runs out before the others."""
    rng = np.random.default_rng(0)
    lengths = [17, 9, 6, 12, 4, 23]
    arts = [Article(str(i), str(i), rng.integers(1, VOCAB, n).astype(np.int32), n) for i, n in enumerate(lengths)]
    return StreamLayout(arts, 3, 5, eos_id=0, pad_articles=pad_articles)


def epochs(lay, n):
    """(chunk, restart) for n epochs of the same layout, as dynlm metatrain reads them."""
    return [(lay.chunk(c), c == 0) for _ in range(n) for c in range(len(lay))]


def unroll_of(lm, p, theta0, rule, k, boundary="continuous", **kw):
    """The meta-training unroll of K chunks over the weights p, theta0 adapted by `rule`."""
    return TruncatedUnroll(Stepper(lm, p, theta0, rule, boundary=boundary, meta=True, **kw), k)


def meta_loss(step):
    return step.nll / step.tokens


def grads(loss, wrt):
    return [torch.zeros_like(w) if g is None else g
            for w, g in zip(wrt, torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True))]


@pytest.mark.parametrize("k,second_order", [(1, False), (2, True)])
@pytest.mark.parametrize("kind,hidden", [("ff", 0), ("rnn", 4)])
def test_meta_gradient_after_a_truncation_is_nonzero_and_matches_finite_differences(k, second_order, kind, hidden):
    lm, p = tiny_lm()
    names = lm.lstm_names()
    theta0 = {n: p[n].clone().requires_grad_() for n in names}  # trained theta0 too
    rule = learner(names, kind, hidden)
    if k > 1:  # chunk_step hands the rule each stream's chunk loss as a constant, even in second order
        with torch.no_grad():
            rule.loss_coef.zero_()
    unroll = unroll_of(lm, p, theta0, rule, k, second_order=second_order)
    data = random_chunks(4 * k)
    params = list(rule.parameters())
    readers, reader = [], None
    for n in range(4):  # consecutive meta-steps: each one's gradient reaches the learner
        readers.append(reader)
        step = unroll(reader, data[n * k:(n + 1) * k])
        g = grads(meta_loss(step), params)
        assert (max(float(x.abs().max()) for x in g) > 0) == (n > 0 or k > 1), n  # step 0, K=1: theta0 only
        reader = step.reader

    # meta-step n after a truncation, as a function of the learner (and theta0): the truncated
    # reader is a constant. At K=1 the loss has no inner gradient that depends on the learner, so
    # first order is the exact gradient; at K=2 second order is. theta0 is checked at the third
    # step: at the second (K=1) the held weights are theta0 itself, where the rule's drift
    # features (d / rms(d)) are not differentiable.
    for n, wrt in ((1, params), (2, params + list(theta0.values()))):
        def loss():
            return meta_loss(unroll(readers[n], data[n * k:(n + 1) * k]))

        g = torch.autograd.grad(loss(), wrt)
        assert max(float(x.abs().max()) for x in g) > 1e-6
        eps, gen = 1e-6, torch.Generator().manual_seed(n)
        for q, gq in zip(wrt, g):
            for _ in range(3):
                idx = tuple(int(torch.randint(0, s, (), generator=gen)) for s in q.shape)
                with torch.no_grad():
                    q[idx] += eps
                up = loss().item()
                with torch.no_grad():
                    q[idx] -= 2 * eps
                down = loss().item()
                with torch.no_grad():
                    q[idx] += eps
                assert gq[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-9), (n, idx)


@pytest.mark.parametrize("boundary", ["continuous", "reset"])
@pytest.mark.parametrize("k", [1, 3])
def test_every_chunk_enters_exactly_one_meta_loss_with_a_learner_gradient(boundary, k):
    lm, p = tiny_lm()
    names = lm.lstm_names()
    theta0 = {n: p[n].clone() for n in names}
    rule = learner(names)
    params = list(rule.parameters())
    lay = layout(pad_articles=boundary == "reset")
    stream = epochs(lay, 2)
    unroll = unroll_of(lm, p, theta0, rule, k, boundary=boundary)
    source, reader, seen, scored = iter(stream), None, [], 0
    for _ in range(len(stream) // k):
        step = unroll(reader, source)
        assert len(step.chunks) == k
        assert step.tokens == sum(int(r.chunk.mask.sum()) for r in step.chunks)
        torch.testing.assert_close(step.nll, sum(r.nll.sum() for r in step.chunks), rtol=0, atol=0)
        for r in step.chunks:
            seen.append(r.chunk)
            for row in range(r.chunk.inputs.shape[0]):
                fresh = r.restarted or (boundary == "reset" and bool(r.chunk.new_article[row]))
                g = grads(r.nll[row].sum(), params)
                moved = max(float(x.abs().max()) for x in g) > 0
                # a row with tokens depends on the learner unless it starts from theta0
                assert moved == (bool(r.chunk.mask[row].any()) and not fresh), (len(seen), row)
                scored += moved
        reader = step.reader
    # every chunk read once, in order, none skipped or repeated, and every token counted once
    assert len(seen) == len(stream) - len(stream) % k
    assert all(a is b for a, b in zip(seen, (c for c, _ in stream)))
    assert scored > len(seen)  # not vacuous


@pytest.mark.parametrize("second_order,checkpoint", [(False, False), (True, False), (False, True), (True, True)])
def test_no_gradient_crosses_a_truncation(second_order, checkpoint):
    lm, p = tiny_lm()
    names = lm.lstm_names()
    rule = learner(names, "rnn", 4)
    theta0 = {n: p[n].clone().requires_grad_() for n in names}
    # the first meta-step runs with its own copies of the learner and of theta0
    rule1, theta1 = copy.deepcopy(rule), {n: v.detach().clone().requires_grad_() for n, v in theta0.items()}
    data = random_chunks(4)
    step1 = unroll_of(lm, p, theta1, rule1, 2, second_order=second_order, checkpoint=checkpoint)(None, data[:2])
    carried = step1.reader
    tensors = ([t for hc in carried.hidden for t in hc] + [*carried.fast.values(), *carried.rule_state.values()]
               + [*carried.held.drift.values(), *carried.held.grads.values(), *carried.held.rule_state.values(),
                  carried.held.loss, carried.held.active])
    assert all(t.grad_fn is None and not t.requires_grad for t in tensors)
    step2 = unroll_of(lm, p, theta0, rule, 2, second_order=second_order, checkpoint=checkpoint)(carried, data[2:])
    before = list(rule1.parameters()) + list(theta1.values())
    assert all(g is None for g in torch.autograd.grad(meta_loss(step2), before, retain_graph=True, allow_unused=True))
    now = grads(meta_loss(step2), list(rule.parameters()) + list(theta0.values()))
    assert all(float(g.abs().max()) > 0 for g in now)


@pytest.mark.parametrize("second_order", [False, True])
def test_checkpointed_unroll_equals_plain_across_truncations(second_order):
    lm, p = tiny_lm()
    names = lm.lstm_names()
    rule = learner(names, "rnn", 4)
    theta0 = {n: p[n].clone().requires_grad_() for n in names}
    wrt = list(rule.parameters()) + list(theta0.values())
    stream = epochs(layout(pad_articles=True), 1)
    readers = {False: None, True: None}
    for n in range(3):
        out = {}
        for ckpt in (False, True):
            step = unroll_of(lm, p, theta0, rule, 2, boundary="reset", second_order=second_order, checkpoint=ckpt)(
                readers[ckpt], stream[2 * n:2 * n + 2])
            out[ckpt] = grads(meta_loss(step), wrt)
            readers[ckpt] = step.reader
        # theta0 from the second step on: in the first, every stream starts at theta0, where the rule's
        # drift features (d / rms(d)) are not differentiable and the two summation orders differ by ~1e-7
        n_compared = len(wrt) if n else len(list(rule.parameters()))
        for a, b in zip(out[False][:n_compared], out[True][:n_compared]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert any(float(a.abs().max()) > 0 for a in out[False])


@pytest.mark.parametrize("kind,hidden", [("ff", 0), ("rnn", 0), ("rnn", 4)])
def test_the_replayed_update_gives_the_carried_weights(kind, hidden):
    """With unchanged parameters the replay is the update again (the rule state exactly, the weights
    up to the rounding of theta0 + drift); padding rows (a stream that has run out) keep their weights."""
    lm, p = tiny_lm()
    names = lm.lstm_names()
    rule = learner(names, kind, hidden)
    theta0 = {n: p[n].clone() for n in names}
    lay = layout(pad_articles=True)
    unroll, reader, padded = unroll_of(lm, p, theta0, rule, 1, boundary="reset"), None, 0
    for chunk, restart in epochs(lay, 1):
        reader = unroll(reader, [(chunk, restart)]).reader
        padded += int((~reader.held.active).sum())
        replayed = replay_held(reader, rule, theta0)
        for name in reader.fast:
            torch.testing.assert_close(replayed.fast[name], reader.fast[name], rtol=0, atol=1e-14, msg=name)
        for name in reader.rule_state:
            assert torch.equal(replayed.rule_state[name], reader.rule_state[name]), name
    assert padded > 0


@pytest.mark.parametrize("how", ["new article", "new epoch"])
def test_a_held_update_does_not_leak_into_streams_that_start_afresh(how):
    lm, p = tiny_lm()
    names = lm.lstm_names()
    rule = learner(names)
    theta0 = {n: p[n].clone() for n in names}
    data = random_chunks(3)
    carried = unroll_of(lm, p, theta0, rule, 2)(None, data[:2]).reader
    assert carried.held is not None
    nxt = data[2]
    if how == "new article":  # every stream starts an article: theta0, zero state, fresh rule state
        nxt = Chunk(nxt.inputs, nxt.targets, nxt.mask, torch.ones(2, dtype=torch.bool), nxt.article, nxt.position)
        got = unroll_of(lm, p, theta0, rule, 1, boundary="reset")(carried, [nxt])
    else:
        got = unroll_of(lm, p, theta0, rule, 1)(carried, [(nxt, True)])
    fresh = unroll_of(lm, p, theta0, rule, 1)(None, [nxt])
    torch.testing.assert_close(got.chunks[0].nll, fresh.chunks[0].nll, rtol=0, atol=1e-15)
    for name in names:
        torch.testing.assert_close(got.reader.fast[name], fresh.reader.fast[name], rtol=0, atol=1e-15)
    assert all(g is None or float(g.abs().max()) == 0
               for g in torch.autograd.grad(meta_loss(got), list(rule.parameters()), allow_unused=True))


def test_the_unroll_needs_k_chunks():
    lm, p = tiny_lm()
    names = lm.lstm_names()
    theta0 = {n: p[n].clone() for n in names}
    with pytest.raises(ValueError, match="needs 3 chunks"):
        unroll_of(lm, p, theta0, learner(names), 3)(None, random_chunks(2))
