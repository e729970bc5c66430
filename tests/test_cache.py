"""The neural cache (Grave et al. 2016): formula, prequential order, batching and article resets."""
import math

import numpy as np
import pytest
import torch

from dynlm.cache import CacheSettings, cache_step, clear_rows, empty_cache
from dynlm.config import ConfigError, ModelConfig
from dynlm.data.articles import Article
from dynlm.prequential import score
from dynlm.model import LSTMLM

EOS = 0
VOCAB = 13


def tiny_lm(dtype=torch.float32, vocab=VOCAB):
    lm = LSTMLM(ModelConfig(emb_size=6, hidden_size=5, n_layers=1, dropout_input=0, dropout_hidden=0,
                            dropout_output=0), vocab)
    return lm, lm.init_params(seed=1, dtype=dtype)


def articles_from(lists):
    return [Article(f"a{i}", f"t{i}", np.asarray(ids, dtype=np.int32), len(ids)) for i, ids in enumerate(lists)]


def random_articles(lengths, seed=0, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    # a small vocabulary, so tokens recur and the cache has something to find
    return articles_from([rng.integers(1, vocab, n) for n in lengths])


def run(lm, params, articles, cache=None, segment_length=5, batch_size=2, boundary="reset"):
    return score(lm, params, articles, eos_id=EOS, segment_length=segment_length, batch_size=batch_size,
                 boundary=boundary, cache=cache)


def reference_nll(lm, params, streams, settings):
    """The formula, position by position: each stream is one list of (input, target) pairs read
    from a zero state; p_cache over the last `window` positions of the same stream."""
    out_all = []
    for inputs, targets in streams:
        with torch.no_grad():
            out, _ = lm.hidden(params, torch.tensor([inputs]), lm.init_state(1, dtype=params["embed"].dtype))
            p_lm = lm.log_probs(params, out[0]).exp()  # (N, V): the full LM distribution
        h = out[0]
        for t, target in enumerate(targets):
            history = range(max(0, t - settings.window), t)
            if not history:
                out_all.append(-math.log(p_lm[t, target].item()))
                continue
            weights = torch.stack([torch.exp(settings.theta * (h[t] @ h[i])) for i in history])
            p_cache = torch.zeros(lm.vocab_size, dtype=h.dtype)
            for w, i in zip(weights, history):
                p_cache[targets[i]] += w / weights.sum()
            p = (1 - settings.lam) * p_lm[t] + settings.lam * p_cache
            out_all.append(-math.log(p[target].item()))
    return np.array(out_all)


def article_stream(ids):
    """One article as read in the stream: the first token is predicted from <eos>."""
    ids = [int(i) for i in ids]
    return [EOS] + ids[:-1], ids


def test_hand_made_chunks_match_the_formula():
    settings = CacheSettings(window=2, theta=1.0, lam=0.5)
    memory = empty_cache(1, 2, 2, "cpu")
    out = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # (B=1, T=3, H=2)
    targets = torch.tensor([[5, 6, 5]])
    lm_nll = torch.ones(1, 3)
    nll, memory = cache_step(memory, out, lm_nll, targets, torch.ones(1, 3, dtype=torch.bool), settings)
    e = math.e
    expected = [1.0,  # empty cache: the LM alone
                1 + math.log(2),  # sees (h0, 5) only; target 6 is not in it: 0.5 * p_LM
                -math.log(0.5 / e + 0.5 * e / (e + 1))]  # sees (h0, 5) with weight e and (h1, 6) with weight 1
    assert nll[0].tolist() == pytest.approx(expected, rel=1e-6)
    # next chunk: the window of 2 has dropped position 0; (h1, 6) weighs 1, (h2, 5) weighs e
    nll, memory = cache_step(memory, torch.tensor([[[1.0, 0.0]]]), torch.ones(1, 1), torch.tensor([[6]]),
                             torch.ones(1, 1, dtype=torch.bool), settings)
    assert nll.item() == pytest.approx(-math.log(0.5 / e + 0.5 / (1 + e)), rel=1e-6)
    assert memory.next_ids.tolist() == [[5, 6]] and memory.valid.all()


@pytest.mark.parametrize("boundary,batch_size", [("reset", 2), ("continuous", 1)])
def test_score_matches_direct_per_position_formula(boundary, batch_size):
    torch.set_default_dtype(torch.float64)
    try:
        lm, params = tiny_lm(torch.float64)
        articles = random_articles([23, 9, 31])
        settings = CacheSettings(window=7, theta=0.7, lam=0.3)  # window < article: truncation is exercised
        got = run(lm, params, articles, settings, segment_length=5, batch_size=batch_size, boundary=boundary)
        if boundary == "reset":  # every article from a zero state and an empty cache
            streams = [article_stream(a.ids) for a in articles]
        else:  # one stream: articles packed, hidden state and cache carried across them
            parts = [article_stream(a.ids) for a in articles]
            streams = [(sum((p[0] for p in parts), []), sum((p[1] for p in parts), []))]
        np.testing.assert_allclose(got.nll, reference_nll(lm, params, streams, settings), rtol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)


def test_lambda_zero_is_exactly_static():
    lm, params = tiny_lm()
    articles = random_articles([40, 17, 26])
    static = run(lm, params, articles)
    cached = run(lm, params, articles, CacheSettings(window=10, theta=0.5, lam=0.0))
    assert np.array_equal(static.nll, cached.nll)
    # and a nonzero lambda does change the numbers (the comparison above can fail)
    assert not np.allclose(static.nll, run(lm, params, articles, CacheSettings(10, 0.5, 0.2)).nll)


def test_cache_never_sees_the_token_it_scores():
    lm, params = tiny_lm(vocab=60)
    lam = 0.25
    # every target is new: a cache that only holds earlier positions has nothing on it
    distinct = articles_from([np.random.default_rng(0).permutation(np.arange(1, 60))[:37]])
    static = run(lm, params, distinct)
    cached = run(lm, params, distinct, CacheSettings(window=50, theta=1.0, lam=lam))
    expected = static.nll - math.log(1 - lam)  # p = (1 - lam) p_LM exactly
    expected[0] = static.nll[0]  # the first token meets an empty cache: the LM alone
    np.testing.assert_allclose(cached.nll, expected, rtol=1e-6)
    # and what comes later never changes an earlier score
    rng = np.random.default_rng(1)
    prefix = rng.integers(1, VOCAB, 20)
    a, b = (articles_from([np.concatenate([prefix, rng.integers(1, VOCAB, 15)])]) for _ in range(2))
    settings = CacheSettings(window=8, theta=1.0, lam=0.4)
    np.testing.assert_array_equal(run(lm, params, a, settings).nll[:20], run(lm, params, b, settings).nll[:20])


def test_one_stream_and_three_streams_give_the_same_numbers():
    lm, params = tiny_lm()
    articles = random_articles([40, 17, 26, 33, 8])
    settings = CacheSettings(window=12, theta=0.8, lam=0.3)
    one = run(lm, params, articles, settings, batch_size=1)
    three = run(lm, params, articles, settings, batch_size=3)
    np.testing.assert_allclose(one.nll, three.nll, rtol=1e-5)
    assert one.nll.sum() == pytest.approx(three.nll.sum(), rel=1e-6)


def test_reset_clears_the_cache_between_articles():
    lm, params = tiny_lm()
    first = random_articles([30], seed=3)[0]
    second = articles_from([first.ids[:20]])[0]  # repeats the first article: a carried cache would help
    settings = CacheSettings(window=50, theta=1.0, lam=0.5)
    after = run(lm, params, [first, second], settings, batch_size=1)  # one stream: A then B
    alone = run(lm, params, [second], settings, batch_size=1)
    np.testing.assert_array_equal(after.nll[after.article == 1], alone.nll)
    # continuous reading keeps A in the cache, and B gets cheaper than on its own
    carried = run(lm, params, [first, second], settings, batch_size=1, boundary="continuous")
    carried_static = run(lm, params, [first, second], batch_size=1, boundary="continuous")
    gain_carried = carried_static.nll[carried.article == 1].sum() - carried.nll[carried.article == 1].sum()
    gain_alone = run(lm, params, [second], batch_size=1).nll.sum() - alone.nll.sum()
    assert gain_carried > gain_alone


def test_clear_rows_forgets_only_new_articles():
    memory = empty_cache(3, 4, 2, "cpu")
    memory.valid[:] = True
    cleared = clear_rows(memory, torch.tensor([False, True, False]))
    assert cleared.valid.tolist() == [[True] * 4, [False] * 4, [True] * 4]


@pytest.mark.parametrize("window,theta,lam", [(0, 0.3, 0.1), (10, -1.0, 0.1), (10, 0.3, 1.0), (10, 0.3, -0.1)])
def test_bad_settings_are_config_errors(window, theta, lam):
    with pytest.raises(ConfigError):
        CacheSettings(window, theta, lam)
