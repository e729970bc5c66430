"""B parallel article streams cut into chunks of T tokens.

Each stream reads its articles in order. With `pad_articles` (the `reset` boundary
setting) every article starts at the start of a chunk, so a stream can go back to its
starting weights and a zero hidden state exactly there; the article's last chunk is
padded and the padding is masked out. Every target token appears exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .articles import Article


@dataclass
class Chunk:
    inputs: Tensor  # (B, T) token fed in
    targets: Tensor  # (B, T) token to predict
    mask: Tensor  # (B, T) bool: a real target (not padding)
    new_article: Tensor  # (B,) bool: an article starts at position 0 of this chunk
    article: Tensor  # (B, T) index into the article list, -1 on padding
    position: Tensor  # (B, T) position of the target in its article

    def to(self, device) -> "Chunk":
        return Chunk(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def assign_streams(lengths: list[int], n_streams: int) -> list[list[int]]:
    """Greedy balance: each article (in order) goes to the least-loaded stream."""
    loads, streams = [0] * n_streams, [[] for _ in range(n_streams)]
    for i, n in enumerate(lengths):
        s = min(range(n_streams), key=loads.__getitem__)
        streams[s].append(i)
        loads[s] += n
    return streams


class StreamLayout:
    def __init__(self, articles: list[Article], n_streams: int, chunk_len: int, eos_id: int, pad_articles: bool = True):
        if not articles:
            raise ValueError("no articles to read")
        if n_streams < 1 or chunk_len < 1:
            raise ValueError(f"need n_streams >= 1 and chunk_len >= 1, got {n_streams}, {chunk_len}")
        n_streams = min(n_streams, len(articles))
        self.articles, self.n_streams, self.chunk_len = articles, n_streams, chunk_len
        rows = [self._stream(idx, articles, chunk_len, eos_id, pad_articles)
                for idx in assign_streams([len(a) for a in articles], n_streams)]
        length = -(-max(len(r[0]) for r in rows) // chunk_len) * chunk_len
        self.n_chunks = length // chunk_len
        fields = []
        for k, fill in enumerate((eos_id, 0, -1, 0, 0)):
            arr = np.full((n_streams, length), fill, dtype=np.int64)
            for s, r in enumerate(rows):
                arr[s, : len(r[k])] = r[k]
            fields.append(torch.from_numpy(arr))
        self._inputs, self._targets, self._article, self._position, starts = fields
        self._starts = starts.bool()

    @staticmethod
    def _stream(indices, articles, chunk_len, eos_id, pad):
        cols = [[], [], [], [], []]  # inputs, targets, article, position, is-start
        for i in indices:
            ids = articles[i].ids.astype(np.int64)
            n = len(ids)
            width = -(-n // chunk_len) * chunk_len if pad else n
            # the first token is predicted from <eos>, as in the running WikiText stream
            inputs = np.full(width, eos_id); inputs[0] = eos_id; inputs[1:n] = ids[:-1]
            targets = np.zeros(width, dtype=np.int64); targets[:n] = ids
            art = np.full(width, -1); art[:n] = i
            pos = np.zeros(width, dtype=np.int64); pos[:n] = np.arange(n)
            start = np.zeros(width, dtype=np.int64); start[0] = 1
            for c, v in zip(cols, (inputs, targets, art, pos, start)):
                c.append(v)
        return [np.concatenate(c) for c in cols]

    def select_streams(self, rows: slice) -> "StreamLayout":
        """The same layout restricted to streams `rows` (one rank's share in data-parallel
        training): same chunk count, so every rank takes the same number of steps; article
        indices still refer to the full article list. Streams own disjoint articles, so
        disjoint row blocks never read the same article."""
        sub = object.__new__(StreamLayout)
        sub.articles, sub.chunk_len, sub.n_chunks = self.articles, self.chunk_len, self.n_chunks
        for name in ("_inputs", "_targets", "_article", "_position", "_starts"):
            setattr(sub, name, getattr(self, name)[rows].clone())  # clone: let the full layout go
        sub.n_streams = sub._inputs.shape[0]
        if sub.n_streams == 0:
            raise ValueError(f"stream selection {rows} of {self.n_streams} streams is empty")
        return sub

    def __len__(self) -> int:
        return self.n_chunks

    def chunk(self, i: int) -> Chunk:
        sl = slice(i * self.chunk_len, (i + 1) * self.chunk_len)
        article = self._article[:, sl]
        return Chunk(
            inputs=self._inputs[:, sl], targets=self._targets[:, sl], mask=article >= 0,
            new_article=self._starts[:, sl.start], article=article, position=self._position[:, sl],
        )

    def __iter__(self):
        return (self.chunk(i) for i in range(self.n_chunks))
