import numpy as np
import pytest
import torch

from dynlm.data.articles import Article
from dynlm.data.streams import StreamLayout, assign_streams


def articles(lengths):
    rng = np.random.default_rng(0)
    return [Article(f"a{i}", f"T{i}", rng.integers(1, 100, n).astype(np.int32), n) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("streams,chunk", [(1, 5), (3, 7), (4, 1), (10, 64)])
def test_every_target_scored_exactly_once(pad, streams, chunk):
    arts = articles([13, 1, 40, 7, 22, 5])
    layout = StreamLayout(arts, streams, chunk, eos_id=0, pad_articles=pad)
    seen = {}
    for c in layout:
        for a, pos, tgt in zip(c.article[c.mask].tolist(), c.position[c.mask].tolist(), c.targets[c.mask].tolist()):
            assert (a, pos) not in seen
            seen[(a, pos)] = tgt
    assert seen == {(i, p): int(t) for i, a in enumerate(arts) for p, t in enumerate(a.ids)}


@pytest.mark.parametrize("pad", [True, False])
def test_inputs_are_previous_tokens(pad):
    arts = articles([9, 12, 4])
    layout = StreamLayout(arts, 2, 4, eos_id=0, pad_articles=pad)
    for c in layout:
        for s in range(c.inputs.shape[0]):
            for t in range(4):
                if c.mask[s, t]:
                    a, pos = int(c.article[s, t]), int(c.position[s, t])
                    prev = 0 if pos == 0 else int(arts[a].ids[pos - 1])
                    assert int(c.inputs[s, t]) == prev


def test_reset_layout_starts_articles_at_chunk_starts():
    arts = articles([9, 12, 4, 30])
    layout = StreamLayout(arts, 2, 5, eos_id=0, pad_articles=True)
    starts = 0
    for c in layout:
        first = c.mask[:, 0] & (c.position[:, 0] == 0)
        assert torch.equal(first, c.new_article)
        starts += int(c.new_article.sum())
        assert not ((c.position[:, 1:] == 0) & c.mask[:, 1:]).any()  # never mid-chunk
    assert starts == len(arts)


def test_streams_read_articles_in_order_and_balanced():
    groups = assign_streams([10, 10, 10, 10, 5], 2)
    assert all(g == sorted(g) for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(5))
