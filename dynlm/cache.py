"""The neural cache of Grave, Joulin & Usunier (2016), "Improving Neural Language Models
with a Continuous Cache": the non-gradient baseline for adapting to the article being read.

Each stream remembers its last `window` (hidden state h_i, next token x_{i+1}) pairs. At
position t the cache puts mass on the tokens that followed similar hidden states,

    p_cache(w) ∝ Σ_i exp(theta · h_t·h_i) [x_{i+1} = w]     over the last `window` positions,
    p(w) = (1 - lambda) p_LM(w) + lambda p_cache(w),

and the pair (h_t, x_{t+1}) enters the cache only after x_{t+1} has been scored (prequential).
A whole chunk is scored in one batched computation: each position attends to
[cache ‖ current chunk] through a causal band mask, so there is no loop over streams or positions.
Only the target's probability is needed, so the full LM distribution is never materialised:
p_LM(target) comes from the NLL the model already computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import RuleConfig


@dataclass(frozen=True)
class CacheSettings:
    window: int  # positions remembered per stream
    theta: float  # flatness: larger = sharper attention on the most similar hidden states
    lam: float  # interpolation weight of the cache distribution

    def __post_init__(self):  # the ranges are rule.cache_*'s, declared once in config/schema.py
        RuleConfig(cache_window=self.window, cache_theta=self.theta, cache_lambda=self.lam)

    @classmethod
    def from_config(cls, cfg: RuleConfig) -> "CacheSettings":
        return cls(cfg.cache_window, cfg.cache_theta, cfg.cache_lambda)


@dataclass
class CacheMemory:
    """Per-stream cache, oldest entry first; empty slots are marked invalid."""
    keys: Tensor  # (B, W, H) hidden states h_i, float32 or wider
    next_ids: Tensor  # (B, W) long: the token x_{i+1} that followed h_i
    valid: Tensor  # (B, W) bool: slot holds a real (scored, non-padding) position


def empty_cache(batch: int, window: int, hidden_size: int, device, dtype=torch.float32) -> CacheMemory:
    dtype = torch.promote_types(dtype, torch.float32)  # bf16 dot products would blur the attention
    return CacheMemory(torch.zeros(batch, window, hidden_size, device=device, dtype=dtype),
                       torch.zeros(batch, window, dtype=torch.long, device=device),
                       torch.zeros(batch, window, dtype=torch.bool, device=device))


def clear_rows(memory: CacheMemory, new_article: Tensor) -> CacheMemory:
    """Forget everything in streams that start a new article. new_article (B,) bool."""
    return CacheMemory(memory.keys, memory.next_ids, memory.valid & ~new_article.unsqueeze(1))


def band_mask(window: int, chunk_len: int, device) -> Tensor:
    """(T, W + T) bool: chunk position t sees key k of [cache ‖ chunk] iff k covers one of the
    `window` positions strictly before t. Key k sits at time k - W relative to the chunk start."""
    t = torch.arange(chunk_len, device=device).unsqueeze(1)  # (T, 1)
    k = torch.arange(window + chunk_len, device=device).unsqueeze(0)  # (1, W + T)
    return (k >= t) & (k < t + window)


def cache_log_prob(queries: Tensor, keys: Tensor, key_ids: Tensor, visible: Tensor, targets: Tensor,
                   theta: float) -> tuple[Tensor, Tensor]:
    """log p_cache(target) per position, and whether anything was visible at all.

    queries (B, T, H), keys (B, K, H), key_ids (B, K), visible (B, T, K) bool, targets (B, T).
    Returns log_p (B, T) (-inf where the target is not in the visible cache) and has_cache (B, T)."""
    scores = theta * torch.bmm(queries, keys.transpose(1, 2))  # (B, T, K)
    scores = scores.masked_fill(~visible, -math.inf)
    log_norm = torch.logsumexp(scores, dim=-1)  # (B, T); -inf where nothing is visible
    hits = key_ids.unsqueeze(1) == targets.unsqueeze(2)  # (B, T, K): key followed by the target
    log_hit = torch.logsumexp(scores.masked_fill(~hits, -math.inf), dim=-1)  # (B, T)
    has_cache = visible.any(-1)  # (B, T)
    return torch.where(has_cache, log_hit - log_norm, torch.full_like(log_hit, -math.inf)), has_cache


def mix_nll(lm_nll: Tensor, cache_log_p: Tensor, has_cache: Tensor, lam: float) -> Tensor:
    """-log((1 - lam) p_LM + lam p_cache); the LM alone where the cache is still empty. All (B, T)."""
    log_lam = math.log(lam) if lam > 0 else -math.inf  # lam = 0 gives back the LM exactly
    mixed = torch.logaddexp(math.log1p(-lam) - lm_nll, log_lam + cache_log_p)  # (B, T)
    return torch.where(has_cache, -mixed, lm_nll)


def cache_step(memory: CacheMemory, out: Tensor, lm_nll: Tensor, targets: Tensor, mask: Tensor,
               settings: CacheSettings) -> tuple[Tensor, CacheMemory]:
    """Score one chunk with the cache, then push the chunk's (h_t, x_{t+1}) pairs into it.

    out (B, T, H) top-layer outputs, lm_nll (B, T) the LM's NLL of targets (B, T), mask (B, T).
    Returns the mixed NLL (B, T) (0 on padding) and the updated memory."""
    window, chunk_len = memory.keys.shape[1], out.shape[1]
    out = out.detach().to(memory.keys.dtype)  # the cache is a fixed function of the hidden states
    keys = torch.cat([memory.keys, out], dim=1)  # (B, W + T, H)
    key_ids = torch.cat([memory.next_ids, targets], dim=1)  # (B, W + T)
    key_valid = torch.cat([memory.valid, mask], dim=1)  # (B, W + T)
    visible = band_mask(window, chunk_len, out.device).unsqueeze(0) & key_valid.unsqueeze(1)  # (B, T, W + T)
    log_p, has_cache = cache_log_prob(out, keys, key_ids, visible, targets, settings.theta)
    nll = mix_nll(lm_nll.to(log_p.dtype), log_p, has_cache, settings.lam).masked_fill(~mask, 0.0)  # (B, T)
    kept = CacheMemory(keys[:, -window:], key_ids[:, -window:], key_valid[:, -window:])  # the last W positions
    return nll.to(lm_nll.dtype), kept
