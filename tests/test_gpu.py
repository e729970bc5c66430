"""The device paths equal the CPU results: every kernel and rule that evaluation and meta-training
take, on a tiny float32 model, run on DYNLM_TEST_DEVICE (default cuda) and on the CPU.

Marked `gpu`: they skip without CUDA, except under DYNLM_TEST_DEVICE=cpu, which `dynlm gpu-check
--device cpu` (the CPU smoke in CI) sets so that these paths stay importable and correct.

Tolerances, stated once: per-token NLLs and gradients agree to RTOL/ATOL in float32 with TF32 off
(the CPU and the GPU sum in different orders; adaptation compounds the differences over ~300 tokens);
the learned rule to LEARNED_TOL over a whole run (the first GPU run measured 1.3e-3), and one
compiled update equals the eager one to RTOL.
bf16 autocast changes the perplexity by at most BF16_PPL_RTOL relative to float32."""
import os

import numpy as np
import pytest
import torch

import dynlm.rules.learned as learned_module
from dynlm.cache import CacheSettings
from dynlm.config import ModelConfig, RuleConfig
from dynlm.data.streams import StreamLayout
from dynlm.prequential import perplexity, score
from dynlm.model import LSTMLM
from dynlm.model.per_stream_lstm import PerStreamLSTM
from dynlm.modes import parse_mode
from dynlm.rules import LearnedRule, adapted_names, compute_grad_rms, make_rule
from dynlm.unroll import Stepper, TruncatedUnroll

from test_dyneval import V, articles  # Zipfian articles over a 40-word vocabulary

pytestmark = pytest.mark.gpu

DEVICE = torch.device(os.environ.get("DYNLM_TEST_DEVICE", "cuda"))
RTOL, ATOL = 1e-4, 1e-4
LEARNED_TOL = 5e-3  # the learned gates (sigmoids of log-magnitudes) amplify rounding over 60 updates
BF16_PPL_RTOL = 0.02
EOS = 0


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def tiny():
    cfg = ModelConfig(emb_size=16, hidden_size=32, n_layers=2, softmax="adaptive", adaptive_cutoffs=[8, 20],
                      dropout_input=0, dropout_hidden=0, dropout_output=0, init_range=0.3)
    lm = LSTMLM(cfg, V)
    return lm, lm.init_params(seed=3)


RULES = RuleConfig(sgd_lr=0.05, dyneval_lr=3e-4, dyneval_lamb=0.02, adam_lr=3e-3, adam_decay=0.01, init_lr=0.05,
                   cache_theta=0.5, cache_lambda=0.3, cache_window=50, compile=False)


def run_mode(mode: str, device, batch: int, boundary: str = "reset", bf16: bool = False, rule_cfg=RULES):
    """Per-token NLLs of one mode on `device` (the evaluation's own path, prequential.score)."""
    lm, p = tiny()
    p = {k: v.to(device) for k, v in p.items()}
    spec = parse_mode(mode)
    names = adapted_names(lm, rule_cfg, spec.rule, p, spec.weights)
    ms = None
    if spec.rule == "dyneval":
        train = StreamLayout(articles([90, 70, 50], seed=1), 2, 5, EOS, pad_articles=False)
        ms = compute_grad_rms(lm, p, train, names, 0, device, stat="batch")
    rule = make_rule(spec.rule, rule_cfg, names, ms=ms)
    if spec.rule == "learned":
        torch.manual_seed(0)
        with torch.no_grad():
            for q in rule.parameters():
                q.add_(0.3 * torch.randn_like(q))  # away from the near-zero init head: the gates matter
        rule = rule.to(device)
    cache = CacheSettings.from_config(rule_cfg) if spec.cache else None
    nll = score(lm, p, articles([120, 80, 60, 40]), eos_id=EOS, segment_length=5, batch_size=batch,
                boundary=boundary, device=device, bf16=bf16, rule=rule, names=names, cache=cache).nll
    # a diverged run would make two devices "agree" on garbage: these settings must adapt sanely
    assert np.isfinite(nll).all() and nll.mean() < 2 * np.log(V), (mode, nll.mean())
    return nll


@pytest.mark.parametrize("mode,batch,boundary", [
    ("static", 3, "reset"),
    ("sgd", 3, "reset"),  # the per-stream LSTM kernel and its hand-written backward
    ("dyneval@lstm", 3, "reset"),
    ("dyneval@all", 3, "reset"),  # sparse, lazily decayed embedding rows
    ("dyneval@all", 1, "continuous"),  # Krause's protocol: one stream, the fused kernel
    ("adam", 3, "reset"),
    ("learned", 3, "reset"),
    ("learned+cache", 3, "reset"),
    ("cache", 3, "reset"),
])
def test_mode_on_device_equals_cpu(mode, batch, boundary):
    got = run_mode(mode, DEVICE, batch, boundary)
    want = run_mode(mode, torch.device("cpu"), batch, boundary)
    tol = LEARNED_TOL if mode.startswith("learned") else RTOL
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_per_stream_lstm_kernel_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    B, T, I, H = 3, 7, 5, 6
    cpu = [torch.randn(*s, generator=g) * 0.5 for s in [(B, T, I), (B, H), (B, H), (B, 4 * H, I), (B, 4 * H, H),
                                                          (B, 4 * H)]]

    def run(device):
        xs = [t.to(device).requires_grad_() for t in cpu]
        out, h, c = PerStreamLSTM.apply(*xs)
        (out.square().sum() + h.sum() + 2 * c.sum()).backward()
        return [out, h, c] + [x.grad for x in xs]

    for got, want in zip(run(DEVICE), run(torch.device("cpu"))):
        torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.filterwarnings("error:torch.compile of the learned rule failed")  # no quiet fallback to eager
def test_learned_update_compiled_equals_eager(monkeypatch):
    """torch.compile's fused update (Triton on CUDA) gives the eager values: one update at RTOL, a whole
    run at LEARNED_TOL (fusion reorders the gate arithmetic; the first GPU run measured 8e-3 after
    60 updates of a learner with random gates, so whole runs are compared loosely)."""
    monkeypatch.setattr(learned_module, "COMPILE_MIN", 0)  # compile even the tiny model's tensors
    lm, p = tiny()
    names = lm.lstm_names()
    g = torch.Generator().manual_seed(1)
    theta0 = {k: p[k].to(DEVICE) for k in names}
    fast = {k: (v + 0.01 * torch.randn(v.shape, generator=g).to(DEVICE)).expand(3, *v.shape).clone()
            for k, v in theta0.items()}
    grads = {k: torch.randn(v.shape, generator=g).to(DEVICE) for k, v in fast.items()}
    loss = torch.tensor([3.0, 4.0, 5.0], device=DEVICE)
    eager = LearnedRule(names, init_lr=0.05).to(DEVICE)
    with torch.no_grad():
        for q in eager.parameters():
            q.add_(0.3 * torch.randn(q.shape, generator=g).to(DEVICE))
    compiled = LearnedRule(names, init_lr=0.05).to(DEVICE)
    compiled.load_state_dict(eager.state_dict())
    compiled.fused()
    state = eager.init_state(fast)
    for _ in range(2):  # the second update reads the state the first wrote
        want, want_state, _ = eager.update(fast, grads, theta0, state, loss)
        got, got_state, _ = compiled.update(fast, grads, theta0, state, loss)
        for k in names:
            torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=1e-6)
            torch.testing.assert_close(got_state[f"v.{k}"], want_state[f"v.{k}"], rtol=RTOL, atol=1e-6)
        fast, state = want, want_state
    assert compiled._compiled is not None
    compiled_cfg = RuleConfig(**{**RULES.__dict__, "compile": True})
    np.testing.assert_allclose(run_mode("learned", DEVICE, 3, rule_cfg=compiled_cfg), run_mode("learned", DEVICE, 3),
                               rtol=LEARNED_TOL, atol=LEARNED_TOL)


@pytest.mark.parametrize("second_order", [False, True])
def test_meta_gradient_on_device_equals_cpu(second_order):
    """One truncated unroll of K=3 chunks: the learner's meta-gradient (second order: through the inner
    gradient) is the same on the device as on the CPU."""
    def meta_grads(device):
        lm, p = tiny()
        p = {k: v.to(device) for k, v in p.items()}
        names = lm.lstm_names()
        torch.manual_seed(0)
        rule = LearnedRule(names, kind="ff", hidden=4, init_lr=0.05)
        with torch.no_grad():
            for q in rule.parameters():
                q.add_(0.3 * torch.randn_like(q))
        rule = rule.to(device)
        layout = StreamLayout(articles([60, 50, 40]), 3, 5, EOS, pad_articles=True)
        theta0 = {k: p[k] for k in names}
        unroll = TruncatedUnroll(Stepper(lm, p, theta0, rule, boundary="reset", meta=True, second_order=second_order), 3)
        step = unroll(None, (layout.chunk(i).to(device) for i in range(3)))
        (step.nll / step.tokens).backward()
        return [q.grad.cpu() for q in rule.parameters()], float(step.nll.detach())

    (got, got_nll), (want, want_nll) = meta_grads(DEVICE), meta_grads(torch.device("cpu"))
    assert got_nll == pytest.approx(want_nll, rel=RTOL)
    assert any(w.abs().sum() > 0 for w in want), "the meta-gradient is zero: the check would be vacuous"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("mode", ["static", "learned"])
def test_bf16_autocast_perplexity_close_to_float32(mode):
    """bf16 autocast (run.bf16, the CUDA default of the paper-scale configs; the CPU smoke runs CPU
    autocast) runs every path, the adaptive softmax's too, and keeps the perplexity close to float32."""
    fp32 = run_mode(mode, DEVICE, 3)
    bf16 = run_mode(mode, DEVICE, 3, bf16=True)
    assert np.isfinite(bf16).all()
    p32, p16 = perplexity(fp32.sum(), len(fp32)), perplexity(bf16.sum(), len(bf16))
    assert abs(p16 - p32) / p32 < BF16_PPL_RTOL, (p16, p32)
