"""AWD-LSTM's small regularisers, as pure functions."""
from __future__ import annotations

from torch import Tensor


def locked_dropout(x: Tensor, p: float, train: bool) -> Tensor:
    """Variational dropout: one mask per sequence, shared over time. x (B, T, F)."""
    if not train or p <= 0:
        return x
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - p) / (1 - p)  # (B, 1, F)
    return x * mask


def embedding_dropout(embed: Tensor, p: float) -> Tensor:
    """Drop whole word types (rows of the embedding), rescaling the rest. embed (V, E), or (B, V, E)
    per stream: the same word types dropped in every stream."""
    if p <= 0:
        return embed
    mask = embed.new_empty(embed.shape[-2], 1).bernoulli_(1 - p) / (1 - p)  # (V, 1)
    return embed * mask
