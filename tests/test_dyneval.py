"""Dynamic evaluation as Krause et al. (2018) ran it, and its sparse all-weights update, on tiny
float64 models.

The reference below is a plain re-implementation of the loops of benkrause/dynamic-evaluation
(`dynamiceval.py`): gradstat (the RMS over training segments of the gradient of a batch's mean
loss, hidden state carried and detached) and evaluate (one stream, segments of 5 tokens, his
update on every parameter through `param.data += dW`), on an nn.Module written by hand with the
weights of a dynlm LSTMLM (one bias per LSTM layer, as dynlm has)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynlm.config import ModelConfig
from dynlm.data.articles import Article
from dynlm.data.streams import StreamLayout
from dynlm.prequential import score
from dynlm.model import LSTMLM
from dynlm.rules import DynEvalRule, SGDRule, compute_grad_rms
from dynlm.rules.adam import AdamDecayRule
from dynlm.rules.base import LazyRows

V, EOS, SEG = 40, 0, 5


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def tiny(softmax: str):
    cfg = ModelConfig(emb_size=8, hidden_size=16, n_layers=2, softmax=softmax, adaptive_cutoffs=[8, 20],
                      dropout_input=0, dropout_hidden=0, dropout_output=0, init_range=0.3)
    lm = LSTMLM(cfg, V)
    return lm, lm.init_params(seed=3, dtype=torch.float64)


def articles(lengths, seed=0):
    """Zipfian tokens, as words are: most embedding rows are read rarely or never."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, V + 1)
    return [Article(f"a{i}", "", rng.choice(V, n, p=zipf / zipf.sum()).astype(np.int32), n)
            for i, n in enumerate(lengths)]


# ---- the reference ------------------------------------------------------------------------------
class KrauseLM(nn.Module):
    """An embedding, LSTM cells by hand (one bias per layer), and dynlm's softmax: the adaptive one
    (nn.AdaptiveLogSoftmaxWithLoss) or the full one tied to the embedding; weights copied."""

    def __init__(self, lm: LSTMLM, params: dict):
        super().__init__()
        self.n_layers, self.adaptive = lm.cfg.n_layers, lm.adaptive
        copy = lambda k: nn.Parameter(params[k].detach().clone())  # noqa: E731
        self.embed = copy("embed")
        self.w_ih = nn.ParameterList([copy(f"lstm.{l}.w_ih") for l in range(self.n_layers)])
        self.w_hh = nn.ParameterList([copy(f"lstm.{l}.w_hh") for l in range(self.n_layers)])
        self.b = nn.ParameterList([copy(f"lstm.{l}.b") for l in range(self.n_layers)])
        if self.adaptive:
            self.asm = nn.AdaptiveLogSoftmaxWithLoss(lm.cfg.hidden_size, V, lm.cfg.adaptive_cutoffs, div_value=4.0)
            self.asm.load_state_dict({k[len("adaptive."):]: v for k, v in params.items() if k.startswith("adaptive.")})
        else:
            self.proj = copy("proj")
            self.out_bias = copy("out_bias")

    def dynlm_name(self, name: str) -> str:
        """This module's parameter name -> the dynlm weight it was copied from."""
        for kind in ("w_ih", "w_hh", "b"):
            if name.startswith(kind + "."):
                return f"lstm.{name.split('.')[1]}.{kind}"
        return "adaptive." + name[len("asm."):] if name.startswith("asm.") else name

    def init_hidden(self, batch):
        return [(torch.zeros(batch, w.shape[1]), torch.zeros(batch, w.shape[1])) for w in self.w_hh]

    def forward(self, x, hidden):
        """x (B, T) -> top-layer outputs (B, T, H), new hidden."""
        h_in, new = F.embedding(x, self.embed), []
        for l in range(self.n_layers):
            h, c = hidden[l]
            outs = []
            for t in range(x.shape[1]):
                gates = h_in[:, t] @ self.w_ih[l].t() + h @ self.w_hh[l].t() + self.b[l]
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            h_in = torch.stack(outs, 1)
            new.append((h, c))
        return h_in, new

    def nll(self, out, y):
        """Per-token NLL (B, T)."""
        flat = out.reshape(-1, out.shape[-1])
        if self.adaptive:
            return -self.asm(flat, y.reshape(-1)).output.view_as(y)
        logits = (flat @ self.proj.t()) @ self.embed.t() + self.out_bias
        return F.cross_entropy(logits, y.reshape(-1), reduction="none").view_as(y)


def detach(hidden):
    return [(h.detach(), c.detach()) for h, c in hidden]


def grad_or_zero(p):  # a cluster of the adaptive softmax that no target falls in gets no gradient
    return torch.zeros_like(p) if p.grad is None else p.grad


def krause_gradstat(ref: KrauseLM, data: torch.Tensor) -> dict:
    """data (B, N): B training streams. MS per parameter: sqrt(sum over segments of grad^2 / segments),
    grad that of the mean loss over the segment's B x (up to) 5 tokens; hidden carried, detached."""
    sq = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    hidden, segments = ref.init_hidden(data.shape[0]), 0
    for i in range(0, data.shape[1] - 1, SEG):
        x, y = data[:, i:i + SEG], data[:, i + 1:i + 1 + SEG]
        x = x[:, :y.shape[1]]
        ref.zero_grad()
        out, hidden = ref(x, detach(hidden))
        ref.nll(out, y).mean().backward()
        for n, p in ref.named_parameters():
            sq[n] += grad_or_zero(p) ** 2
        segments += 1
    return {n: (s / segments).sqrt() for n, s in sq.items()}


def krause_evaluate(ref: KrauseLM, ms: dict, seq: torch.Tensor, lr, lamb, eps) -> torch.Tensor:
    """seq (N,): one stream. Per-token NLLs of seq[1:], each segment of 5 scored before its update
    dW = lamb * decrate * (data0 - W) - lr * grad / (MS + eps) on every parameter."""
    gsum = torch.stack([m.mean() for m in ms.values()]).mean()  # mean over tensors of mean(MS)
    decrate = {n: (m / gsum).clamp(max=1 / lamb) for n, m in ms.items()}
    data0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    hidden, nlls = ref.init_hidden(1), []
    for i in range(0, len(seq) - 1, SEG):
        x, y = seq[None, i:i + SEG], seq[None, i + 1:i + 1 + SEG]
        x = x[:, :y.shape[1]]
        ref.zero_grad()
        out, hidden = ref(x, detach(hidden))
        nll = ref.nll(out, y)
        nll.mean().backward()
        for n, p in ref.named_parameters():
            dW = lamb * decrate[n] * (data0[n] - p.data) - lr * grad_or_zero(p) / (ms[n] + eps)
            p.data += dW
        nlls.append(nll.detach()[0])
    return torch.cat(nlls)


# ---- the tests ----------------------------------------------------------------------------------
@pytest.fixture
def lazy_calls(monkeypatch):
    """How many chunks took the sparse row update."""
    calls = []
    write_back = LazyRows.write_back

    def spy(self, *a, **k):
        calls.append(len(self.rows))
        return write_back(self, *a, **k)

    monkeypatch.setattr(LazyRows, "write_back", spy)
    return calls


@pytest.mark.parametrize("softmax", ["adaptive", "full"])
def test_dyneval_reproduces_krause_gradstat_and_evaluation(softmax, lazy_calls):
    lm, p = tiny(softmax)
    # gradstat: 4 training streams of 58 targets each (the last segment 3 tokens), read continuously
    train = articles([58] * 4, seed=1)
    layout = StreamLayout(train, 4, SEG, EOS, pad_articles=False)
    ms = compute_grad_rms(lm, p, layout, list(p), 0, "cpu", stat="batch")
    ref = KrauseLM(lm, p)
    data = torch.tensor(np.stack([np.concatenate([[EOS], a.ids]) for a in train]), dtype=torch.long)
    ms_ref = {ref.dynlm_name(n): m for n, m in krause_gradstat(ref, data).items()}
    assert set(ms_ref) == set(p)
    for k in p:
        torch.testing.assert_close(ms[k], ms_ref[k], rtol=1e-8, atol=1e-12, msg=k)

    # evaluation: one stream of 123 targets (the last segment 3 tokens), every weight adapted
    lr, lamb, eps = 1e-3, 0.2, 2e-5  # adapts without diverging; decrate is clipped at 1 / lamb = 5
    gsum = torch.stack([m.mean() for m in ms.values()]).mean()
    assert any(bool((m / gsum > 1 / lamb).any()) for m in ms.values())  # the clipping of decrate takes part
    test = articles([123], seed=2)
    got = score(lm, p, test, eos_id=EOS, segment_length=SEG, batch_size=1, boundary="continuous",
                rule=DynEvalRule(ms, lr, lamb, eps), names=list(p))
    want = krause_evaluate(ref, {n: ms_ref[ref.dynlm_name(n)] for n, _ in ref.named_parameters()},
                           torch.tensor(np.concatenate([[EOS], test[0].ids]), dtype=torch.long), lr, lamb, eps)
    assert len(got.nll) == len(want) == 123
    torch.testing.assert_close(torch.from_numpy(got.nll), want, rtol=1e-5, atol=0)
    static = score(lm, p, test, eos_id=EOS, segment_length=SEG, batch_size=1, boundary="continuous")
    assert static.nll.mean() - 0.1 < got.nll.mean() < static.nll.mean() - 0.003  # it adapts, it helps, it stays sane
    # the adaptive softmax leaves the embedding input-only: sparse rows; the tied one is dense
    assert (len(lazy_calls) == 25) if softmax == "adaptive" else not lazy_calls


def _dyneval(p, lamb=0.3):
    g = torch.Generator().manual_seed(5)
    ms = {k: torch.rand(v.shape, generator=g) ** 3 + 1e-3 for k, v in p.items()}  # skewed, so decrate clips
    return DynEvalRule(ms, lr=0.01, lamb=lamb, eps=2e-5)


RULES = {"dyneval": _dyneval, "sgd": lambda p: SGDRule(0.5),
         # its second moment decays lazily with the rows (Rule.row_state_keys)
         "adam": lambda p: AdamDecayRule(lr=0.02, decay=0.2, max_step=3.0)}


@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("batch, boundary", [(1, "continuous"), (3, "reset")])
def test_sparse_row_update_equals_the_dense_update(rule_name, batch, boundary, lazy_calls):
    lm, p = tiny("adaptive")
    test = articles([37, 61, 23, 80, 45], seed=4)  # B = 3 with resets: streams read 2, 2 and 1 articles

    def run(sparse: bool):
        rule = RULES[rule_name](p)
        rule.sparse_rows = sparse
        return score(lm, p, test, eos_id=EOS, segment_length=SEG, batch_size=batch, boundary=boundary,
                     rule=rule, names=list(p))

    dense = run(False)
    assert not lazy_calls
    sparse = run(True)
    assert lazy_calls and max(lazy_calls) < V  # chunks read a block of the embedding's rows, not all of it
    assert len(sparse.nll) == sum(len(a) for a in test) >= 100
    if boundary == "reset":
        layout = StreamLayout(test, batch, SEG, EOS)
        assert any(bool(c.new_article.any()) for c in list(layout)[1:])  # an article reset mid-stream
    static = score(lm, p, test, eos_id=EOS, segment_length=SEG, batch_size=batch, boundary=boundary)
    assert np.abs(dense.nll - static.nll).max() > 1e-3 and dense.nll.mean() < static.nll.mean()  # it adapts, sanely
    np.testing.assert_allclose(sparse.nll, dense.nll, rtol=1e-5, atol=0)
    np.testing.assert_allclose(sparse.drift, dense.drift, rtol=1e-9, atol=0)  # pending decay materialised


def test_lazy_decay_is_the_repeated_dense_decay_and_materialise_catches_up():
    lm, p = tiny("adaptive")
    rule = _dyneval(p, lamb=0.9)
    fast = {"embed": p["embed"].expand(2, *p["embed"].shape).clone()}
    fast["embed"][:, 3] += 1.0  # a drifted row
    state = rule.init_state(fast)
    assert state[LazyRows.STEP].tolist() == [0, 0]
    state = {**state, LazyRows.STEP: torch.tensor([4, 0]), LazyRows.last_key("embed"): torch.tensor([[1] * V, [0] * V])}
    dense = fast["embed"].clone()
    for _ in range(3):  # stream 0 missed 3 updates of row 3 with a zero gradient
        dense[0] = torch.lerp(dense[0], p["embed"], rule.pull["embed"])
    got, new_state = rule.materialise({k: v.clone() for k, v in fast.items()}, p, state)
    torch.testing.assert_close(got["embed"], dense)
    assert new_state[LazyRows.last_key("embed")][0].eq(4).all() and new_state[LazyRows.last_key("embed")][1].eq(0).all()


def test_dense_dyneval_update_is_krause_formula():
    g = torch.Generator().manual_seed(0)
    theta0 = {"w": torch.randn(4, 3, generator=g)}
    fast = {"w": theta0["w"] + torch.randn(2, 4, 3, generator=g)}
    grads = {"w": torch.randn(2, 4, 3, generator=g)}
    ms = {"w": torch.rand(4, 3, generator=g) + 0.1}
    rule = DynEvalRule(ms, lr=0.1, lamb=0.4, eps=1e-3)
    new, _, _ = rule.update(fast, grads, theta0, {}, torch.zeros(2))
    decrate = (ms["w"] / ms["w"].mean()).clamp(max=1 / 0.4)
    want = fast["w"] + 0.4 * decrate * (theta0["w"] - fast["w"]) - 0.1 * grads["w"] / (ms["w"] + 1e-3)
    torch.testing.assert_close(new["w"], want)
    rows = torch.tensor([2, 0])  # a block of rows takes those rows' coefficients
    blk, _, _ = rule.update({"w": fast["w"][:, rows]}, {"w": grads["w"][:, rows]}, {"w": theta0["w"][rows]}, {},
                            torch.zeros(2), rows={"w": rows})
    torch.testing.assert_close(blk["w"], want[:, rows])


def test_grad_rms_batch_statistic_is_the_gradient_of_the_batch_mean_loss():
    lm, p = tiny("adaptive")
    train = articles([30, 17, 25], seed=6)
    layout = StreamLayout(train, 3, SEG, EOS, pad_articles=False)
    ms = compute_grad_rms(lm, p, layout, ["lstm.0.w_hh", "embed"], 4, "cpu", stat="batch")
    sq, state = {k: torch.zeros_like(p[k]) for k in ms}, lm.init_state(3, dtype=torch.float64)
    for c in list(layout)[:4]:  # never reset, shared weights, the mean over the chunk's real tokens
        w = {k: v.clone().requires_grad_() for k, v in p.items()}
        out, state = lm.hidden(w, c.inputs, detach(state))
        loss = (lm.nll(w, out, c.targets) * c.mask).sum() / c.mask.sum()
        for k in ms:
            g, = torch.autograd.grad(loss, [w[k]], retain_graph=True)
            sq[k] += g ** 2
    for k in ms:
        torch.testing.assert_close(ms[k], (sq[k] / 4).sqrt())
    with pytest.raises(ValueError, match="gradient statistic"):
        compute_grad_rms(lm, p, layout, ["embed"], 1, "cpu", stat="nope")


def test_grad_rms_for_computes_every_weight_once_under_a_key_of_what_it_depends_on(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from dynlm import evaluate
    from dynlm.config import load_config

    lm, p = tiny("adaptive")
    train = articles([30, 17, 25, 40], seed=7)
    monkeypatch.setattr(evaluate, "load_articles", lambda data, split, tok: train)
    calls, real = [], evaluate.compute_grad_rms
    monkeypatch.setattr(evaluate, "compute_grad_rms", lambda *a, **k: calls.append(k["stat"]) or real(*a, **k))
    tok = SimpleNamespace(eos_id=EOS)

    def grad_rms(*overrides):
        cfg = load_config(overrides=["eval.segment_length=5", "eval.batch_size=2", "rule.grad_stat_streams=3",
                                     *overrides])
        return evaluate.grad_rms_for(tmp_path, lm, p, cfg, tok, "cpu")

    ms = grad_rms("rule.dyneval_weights=lstm")
    assert set(ms) == set(p) and calls == ["batch"]  # every weight, even for dyneval on the LSTM alone
    want = compute_grad_rms(lm, p, StreamLayout(train, 3, SEG, EOS, pad_articles=False), list(p), 0, "cpu",
                            stat="batch")  # rule.grad_rms_chunks=0: the whole training split
    for k in p:
        torch.testing.assert_close(ms[k], want[k])
    again = grad_rms("rule.dyneval_weights=all", "rule.dyneval_lr=0.5")  # neither changes MS: the same file
    assert calls == ["batch"] and all(torch.equal(again[k], ms[k]) for k in p)
    grad_rms("rule.grad_stat=stream")
    grad_rms("rule.grad_stat_streams=2")
    grad_rms("rule.grad_rms_chunks=2")
    assert calls == ["batch", "stream", "batch", "batch"]
    assert len(list((tmp_path / "grad_rms").glob("batch-seg5-*.pt"))) == 3
    assert len(list((tmp_path / "grad_rms").glob("stream-seg5-*.pt"))) == 1
