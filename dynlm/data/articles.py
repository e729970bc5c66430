"""The unit every source yields: an article, first as text lines, then as token ids."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RawArticle:
    id: str  # stable within its corpus and split, e.g. "valid/0007"
    title: str
    lines: tuple[str, ...]  # WikiText-style lines, title line included, no newline chars


@dataclass(frozen=True)
class Article:
    id: str
    title: str
    ids: np.ndarray  # (N,) int32 token ids; each WikiText line ends with <eos>
    n_words: int  # whitespace words + one <eos> per line (per-word perplexity denominator)

    def __len__(self) -> int:
        return len(self.ids)
