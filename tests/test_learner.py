"""The learned rule's gates: magnitude features let it gate per coordinate, signed ones cannot.

A synthetic inner problem, no language model: two tensors (gradient scales 1 and 100, so the
per-tensor normalisation matters), a quadratic loss per coordinate, a noisy gradient. Odd
coordinates must move (each stream's target sits 2-4 away from theta0, in a random direction),
even ones must stay (their target is theta0: their gradient is the pull back plus pure noise).
"""
import functools
import math
import time
import warnings

import pytest
import torch

import dynlm.rules.learned as L
from dynlm.config import RuleConfig
from dynlm.rules import make_rule
from dynlm.rules.learned import FEATURE_SETS, LearnedRule, linear_gated_update

SHAPES = {"a": (4, 8), "b": (16,)}
GRAD_SCALE = {"a": 1.0, "b": 100.0}
NOISE = 1.0  # gradient noise, in units of the loss's own gradient
STEP_SIZE = 1.5  # per-tensor step size, held fixed: the input gate has to carry the step (see below)
B, K, META_STEPS, META_LR = 8, 8, 150, 0.05


def synthetic_tasks(batch, gen):
    theta0 = {k: 0.1 * torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    move = {k: (torch.arange(math.prod(s)) % 2 == 1).view(s) for k, s in SHAPES.items()}
    target = {}
    for k, s in SHAPES.items():
        far = 2 + 2 * torch.rand(batch, *s, generator=gen)
        sign = 2 * torch.randint(0, 2, (batch, *s), generator=gen) - 1
        target[k] = theta0[k] + move[k] * far * sign
    return theta0, move, target


def inner_loop(rule, batch, gen, record=False):
    """K updates of the rule on fresh tasks; returns the mean loss after each update, the move mask,
    and (record) the per-coordinate gates of every update."""
    theta0, move, target = synthetic_tasks(batch, gen)
    fast = {k: theta0[k].expand(batch, *s).clone() for k, s in SHAPES.items()}
    state, total, gates = rule.init_state(fast), 0.0, []
    rule.record_gates = record
    for _ in range(K):
        err = {k: fast[k] - target[k] for k in SHAPES}
        loss = sum(0.5 * e.pow(2).flatten(1).mean(1) for e in err.values())  # (batch,)
        grads = {k: GRAD_SCALE[k] * (err[k] + NOISE * torch.randn(err[k].shape, generator=gen)).detach() for k in SHAPES}
        fast, state, stats = rule.update(fast, grads, theta0, state, loss.detach())  # first order, as in metatrain
        total = total + sum(0.5 * (fast[k] - target[k]).pow(2).flatten(1).mean(1) for k in SHAPES).mean()
        gates.append(stats.get("gates"))
    rule.record_gates = False
    return total / K, move, gates


@functools.lru_cache(maxsize=None)
def meta_trained(features, kind, steps=META_STEPS, seed=0):
    """(held-out meta-loss, {gate: (mean over move coordinates, mean over hold ones)}, seconds)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rule = LearnedRule(list(SHAPES), kind=kind, features=features, init_lr=STEP_SIZE)
    # The step size stays fixed: learned, it grows and the gates shrink for every coordinate
    # (mean input gate 0.13 on moving vs 0.05 on held coordinates at lr 2.1), and mean gates stop
    # being a readable measure of what the learner separates.
    rule.log_lr.requires_grad_(False)
    opt = torch.optim.Adam([p for p in rule.parameters() if p.requires_grad], lr=META_LR)
    for _ in range(steps):
        loss, _, _ = inner_loop(rule, B, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        loss, move, gates = inner_loop(rule, 64, torch.Generator().manual_seed(1000 + seed), record=True)
    means = {}
    for j, name in enumerate(("forget", "input")):
        on = lambda keep: torch.cat([g[k][j][:, keep(move[k])].flatten() for g in gates for k in SHAPES]).mean().item()
        means[name] = (on(lambda m: m), on(lambda m: ~m))
    return loss.item(), means, seconds


def test_an_untrained_learner_of_either_feature_set_keeps_its_weights_and_takes_small_steps():
    for features in FEATURE_SETS:
        rule = LearnedRule(list(SHAPES), features=features)
        loss, move, gates = inner_loop(rule, 4, torch.Generator().manual_seed(0), record=True)
        for f, i in (g[k] for g in gates for k in SHAPES):
            torch.testing.assert_close(f, torch.full_like(f, torch.sigmoid(torch.tensor(5.0)).item()))
            torch.testing.assert_close(i, torch.full_like(i, 0.5))


@pytest.mark.parametrize("kind", ["ff", "rnn"])
def test_magnitude_learner_learns_to_gate_each_coordinate(kind):
    loss, gates, seconds = meta_trained("magnitude", kind)
    untrained, _, _ = inner_loop(LearnedRule(list(SHAPES), kind=kind, init_lr=STEP_SIZE), 64,
                                 torch.Generator().manual_seed(1000))
    move_i, hold_i = gates["input"]
    print(f"magnitude {kind}: meta-loss {loss:.3f} (untrained {untrained.item():.3f}), input gate move {move_i:.3f} "
          f"hold {hold_i:.3f}, forget move {gates['forget'][0]:.3f} hold {gates['forget'][1]:.3f}, {seconds:.1f} s")
    # measured (150 steps, seeds 0 and 1): input gate 0.32 vs 0.08, meta-loss 0.32-0.34 (untrained 1.09)
    assert move_i - hold_i > 0.15 and move_i > 2.5 * hold_i
    assert loss < 0.5 * untrained.item()


def test_signed_learner_cannot_gate_per_coordinate_and_is_clearly_worse():
    signed_loss, gates, seconds = meta_trained("signed", "ff")
    magnitude_loss, _, _ = meta_trained("magnitude", "ff")
    print(f"signed ff: meta-loss {signed_loss:.3f} (magnitude {magnitude_loss:.3f}), input gate move {gates['input'][0]:.3f} "
          f"hold {gates['input'][1]:.3f}, forget move {gates['forget'][0]:.3f} hold {gates['forget'][1]:.3f}, {seconds:.1f} s")
    # The task is symmetric under theta - theta0 -> -(theta - theta0), g -> -g, which flips every
    # signed feature but none of the halves: a gate linear in them cannot favour one half.
    # measured: input gates equal to 1e-3, meta-loss 0.64-0.65 vs 0.34
    for move, hold in gates.values():
        assert abs(move - hold) < 0.02
    assert signed_loss > 1.5 * magnitude_loss


def random_rule(features, kind="ff", hidden=0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    rule = LearnedRule(list(SHAPES), kind=kind, hidden=hidden, features=features, init_lr=0.1)
    with torch.no_grad():
        for q in rule.parameters():
            q.add_(0.5 * torch.randn_like(q))
    return rule.to(dtype)  # the same values in every dtype


def random_inputs(batch=3, dtype=torch.float64, seed=0, steps=3):
    """fast, grads, theta0, a rule state after a few steps' worth of v, and the loss."""
    gen = torch.Generator().manual_seed(seed)
    theta0 = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    fast = {k: theta0[k] + 0.1 * torch.randn(batch, *s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    grads = {k: GRAD_SCALE[k] * torch.randn(batch, *s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    loss = torch.rand(batch, generator=gen, dtype=torch.float64) * 5
    cast = lambda d: {k: v.to(dtype) for k, v in d.items()}
    return cast(fast), cast(grads), cast(theta0), loss.to(dtype)


def run_update(rule, fast, grads, theta0, loss, prev_steps=2):
    state = rule.init_state(fast)
    for _ in range(prev_steps):  # a non-trivial v, t and (rnn) previous gates
        fast, state, _ = rule.update(fast, grads, theta0, state, loss)
    rule.record_gates = True
    new, state, stats = rule.update(fast, grads, theta0, state, loss)
    rule.record_gates = False
    return new, state, stats["gates"]


@pytest.mark.parametrize("kind,hidden", [("ff", 0), ("rnn", 0), ("ff", 4), ("rnn", 4)])
def test_float32_agrees_with_float64(kind, hidden):
    F = {k: torch.rand(s, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3 for k, s in SHAPES.items()}
    out = {}
    for dtype in (torch.float64, torch.float32):
        rule = random_rule("magnitude", kind, hidden, dtype)
        rule.consolidation = F  # converted to each update's dtype
        out[dtype] = run_update(rule, *random_inputs(dtype=dtype))
    for k in SHAPES:
        torch.testing.assert_close(out[torch.float32][0][k].double(), out[torch.float64][0][k], rtol=1e-5, atol=1e-5)
        for a, b in zip(out[torch.float32][2][k], out[torch.float64][2][k]):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_update_agrees_with_eager(monkeypatch):
    # the default learner (ff, hidden 0, magnitude features) with consolidation weights; without
    # autograd one compile takes ~12 s on one busy core (~40 s with it), so one variant only
    monkeypatch.setattr(L, "COMPILE_MIN", 0)  # every tensor takes the compiled path
    inputs = random_inputs(dtype=torch.float32, batch=5)
    F = {k: torch.rand(s, generator=torch.Generator().manual_seed(3)) * 3 for k, s in SHAPES.items()}
    eager = random_rule("magnitude", dtype=torch.float32)
    compiled = random_rule("magnitude", dtype=torch.float32).fused()
    eager.consolidation = compiled.consolidation = F
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_update(compiled, *inputs)
        want = run_update(eager, *inputs)
    if compiled._compiled is None:  # a failed compile warns and falls back to eager
        pytest.skip(f"torch.compile unavailable here: {[str(w.message) for w in caught if 'compile' in str(w.message)]}")
    for k in SHAPES:
        torch.testing.assert_close(got[0][k], want[0][k], rtol=1e-5, atol=1e-6)
        for a, b in zip(got[2][k], want[2][k]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_magnitude_gates_do_not_depend_on_the_scale_of_a_tensor():
    rule = random_rule("magnitude")
    fast, grads, theta0, loss = random_inputs()
    _, _, gates = run_update(rule, fast, grads, theta0, loss, prev_steps=0)
    # drift x 1e-3, gradient x 1000 (up, so that Adam's eps stays negligible)
    scaled = {k: theta0[k] + 1e-3 * (fast[k] - theta0[k]) for k in SHAPES}
    _, _, gates_scaled = run_update(rule, scaled, {k: 1000 * g for k, g in grads.items()}, theta0, loss, prev_steps=0)
    for k in SHAPES:
        for a, b in zip(gates[k], gates_scaled[k]):
            torch.testing.assert_close(a, b)


def test_consolidation_weights_enter_the_gates_as_log_f_and_default_to_one():
    rule = random_rule("magnitude")
    inputs = random_inputs()
    _, _, plain = run_update(rule, *inputs)
    rule.consolidation = {k: torch.ones(s, dtype=torch.float64) for k, s in SHAPES.items()}
    _, _, ones = run_update(rule, *inputs)
    F = {k: torch.rand(s, dtype=torch.float64) * 4 for k, s in SHAPES.items()}
    rule.consolidation = F
    _, _, weighted = run_update(rule, *inputs, prev_steps=0)
    rule.consolidation = None
    _, _, none = run_update(rule, *inputs, prev_steps=0)
    c = rule.coef[FEATURE_SETS["magnitude"].index("consolidation")].detach()  # (forget, input) coefficients
    for k in SHAPES:
        for j in range(2):
            torch.testing.assert_close(ones[k][j], plain[k][j])
            shift = torch.logit(weighted[k][j]) - torch.logit(none[k][j])
            torch.testing.assert_close(shift, (c[j] * F[k].clamp(min=1e-4).log()).expand_as(shift))


def old_state(kind, hidden, n_tensors, gen):
    """A learner state as the first version saved it (signed features, no feature-set key)."""
    state = {"gate_bias": torch.randn(n_tensors, 2, generator=gen), "loss_coef": torch.randn(2, generator=gen),
             "log_lr": torch.randn(n_tensors, generator=gen) - 3}
    n_in = 4 + (2 if kind == "rnn" and hidden == 0 else 0)
    if hidden == 0:
        state["coef"] = torch.randn(n_in, 2, generator=gen)
    elif kind == "ff":
        state.update({"body.0.weight": torch.randn(hidden, n_in, generator=gen), "body.0.bias": torch.randn(hidden, generator=gen)})
    else:
        state.update({"body.weight_ih": torch.randn(3 * hidden, n_in, generator=gen),
                      "body.weight_hh": torch.randn(3 * hidden, hidden, generator=gen),
                      "body.bias_ih": torch.randn(3 * hidden, generator=gen),
                      "body.bias_hh": torch.randn(3 * hidden, generator=gen)})
    if hidden:
        state.update({"head.weight": torch.randn(2, hidden, generator=gen), "head.bias": torch.randn(2, generator=gen)})
    return state


@pytest.mark.parametrize("kind,hidden", [("ff", 0), ("rnn", 0), ("ff", 4), ("rnn", 4)])
def test_an_old_signed_learner_state_loads_and_runs_as_signed(kind, hidden):
    names = list(SHAPES)
    state = old_state(kind, hidden, len(names), torch.Generator().manual_seed(0))
    cfg = RuleConfig(learner=kind, learner_hidden=hidden, compile=False)
    assert cfg.learner_features == "magnitude"  # today's default, which the old state overrides
    with pytest.warns(UserWarning, match="'signed' features"):
        rule = make_rule("learned", cfg, names, learner_state=state).double()
    assert rule.features == "signed" and rule.n_in == 4 + (2 if kind == "rnn" and hidden == 0 else 0)
    for k, v in rule.state_dict().items():
        torch.testing.assert_close(v, state[k].double())
    fast, grads, theta0, loss = random_inputs()
    new, _, gates = run_update(rule, fast, grads, theta0, loss, prev_steps=0)
    if hidden == 0:  # exactly the first version's update (linear_gated_update is unchanged)
        B = loss.shape[0]
        for j, k in enumerate(names):
            t = torch.ones(B, dtype=torch.float64)
            bias = rule.gate_bias[j] + (loss.view(B, 1) / 10) * rule.loss_coef
            n = theta0[k].numel()
            zeros = torch.zeros(B, n, dtype=torch.float64)
            prev = (zeros + 1, zeros) if kind == "rnn" else ()  # the initial recurrent gates
            want, _, _, _ = linear_gated_update(fast[k].reshape(B, -1), grads[k].reshape(B, -1), zeros,
                                                theta0[k].reshape(-1), t, rule.coef, bias, rule.log_lr[j].exp(),
                                                rule.max_step, None, *prev)
            torch.testing.assert_close(new[k], want.view_as(new[k]).detach())
    assert all(torch.isfinite(v).all() for v in new.values())


def test_resuming_an_old_run_keeps_the_optimizers_parameters():
    # metatrain builds the rule from the config, then the optimizer, then loads the checkpoint's learner
    names = list(SHAPES)
    rule = LearnedRule(names)  # magnitude
    opt = torch.optim.Adam(rule.parameters(), lr=0.1)
    old = old_state("ff", 0, len(names), torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning):
        rule.load_state_dict(old)
    assert rule.coef.shape == (4, 2) and any(p is rule.coef for g in opt.param_groups for p in g["params"])
    inputs = random_inputs(dtype=torch.float32)
    new, _, _ = rule.update(*inputs[:3], rule.init_state(inputs[0]), inputs[3])
    sum(v.sum() for v in new.values()).backward()
    before = rule.coef.detach().clone()
    opt.step()
    assert not torch.equal(before, rule.coef.detach())
    # and a magnitude state loads into a rule built for signed features the same way
    back = LearnedRule(names, features="signed")
    with pytest.warns(UserWarning):
        back.load_state_dict(LearnedRule(names).state_dict())
    assert back.features == "magnitude" and back.coef.shape == (len(FEATURE_SETS["magnitude"]), 2)
