"""How fast the machine allows: its sustained memory bandwidth, and the bytes an online or
meta-training step must move per token at minimum, so that `dynlm bench` can say what fraction
of the bound each workload reaches.

Per-stream fast weights make online adaptation memory-bound: every stream re-reads its own copy
of each recurrent matrix at every time step. The counts below are lower bounds under an ideal
implementation (every tensor crosses memory the fewest times the algorithm allows; nothing that
fits no cache is assumed cached), in the weights' storage dtype:

- forward: every time step reads each recurrent matrix w_hh once per copy (one shared copy, or
  one per stream when adapted); every other weight is read once per chunk per copy. Embedding
  rows count as the rows looked up; a softmax is read once per chunk.
- adaptation (a rule): the backward reads each per-stream w_hh again at every time step (for the
  hidden-state gradient) and every other adapted weight once; the update reads the weights and
  their gradient and writes the weights (3 passes over each per-stream copy), reads and writes
  the rule's per-stream state (2 passes) and reads its shared per-coordinate state (theta0, MS)
  once. An adapted embedding counts as the rows touched (rules.base.LazyRows).
- meta-training: the online traffic twice (the outer backward re-reads what the inner step read),
  three times at second order (it also differentiates the inner backward).

The bandwidth is STREAM's triad (a = b + s c, 2 reads and 1 write per element) on arrays far
beyond the caches, timed with torch.utils.benchmark (warm-up, CUDA synchronisation, threads)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils import benchmark

TRIAD_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}  # float32: 128 MiB / 1 GiB per array, well past any cache


def triad_bandwidth(device: torch.device, elements: int | None = None, min_run_time: float = 0.5) -> float:
    """Sustained memory bandwidth of `device` in bytes/s: STREAM's triad on float32 arrays."""
    n = elements or TRIAD_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    a, b, c = (torch.empty(n, device=device).uniform_() for _ in range(3))
    timer = benchmark.Timer(stmt="torch.add(b, c, alpha=3.0, out=a)", globals={"torch": torch, "a": a, "b": b, "c": c},
                            num_threads=torch.get_num_threads(), label="triad")
    seconds = timer.blocked_autorange(min_run_time=min_run_time).median
    del a, b, c
    return 3 * n * 4 / seconds


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def online_bytes_per_token(params: dict[str, Tensor], adapted: list[str], rule_state: dict[str, Tensor], streams: int,
                           segment: int, *, shared_state: int = 0) -> float:
    """Minimum bytes moved per token by one chunk step of `streams` x `segment` tokens (module doc).

    params: every weight (shared copies); adapted: the names each stream holds its own copy of (empty:
    static evaluation); rule_state: the rule's per-stream state tensors (B, ...); shared_state: extra
    shared per-coordinate tensors the update reads besides theta0 (dyneval's MS: 1). The embedding
    counts as the rows read (an update need touch no other row: rules.base.LazyRows)."""
    B, T = streams, segment
    adapted_set = set(adapted)
    total = 0.0
    for k, w in params.items():
        size = _nbytes(w)
        copies = B if k in adapted_set else 1
        if k == "embed":  # rows looked up: one per token
            row = size / w.shape[0]
            total += B * T * row * (1 if k not in adapted_set else 1 + 1 + 3)  # lookup; backward, update
            continue
        recurrent = k.endswith(".w_hh")
        reads = T if recurrent else 1  # forward
        if k in adapted_set:
            reads *= 2  # the backward reads it again
            total += copies * size * 3  # update: read weights and gradient, write weights
        total += copies * size * reads
    dense = [k for k in adapted if k != "embed"]
    total += sum(_nbytes(params[k]) for k in dense) * (1 + shared_state)  # theta0 (and MS), shared
    total += 2 * sum(_nbytes(v) for k, v in rule_state.items() if v.dim() > 1)  # per-stream state: read, write
    return total / (B * T)


META_TRAFFIC = {False: 2.0, True: 3.0}  # first / second order: x the online traffic (module doc)


def fraction_of_bound(tokens_per_s: float, bytes_per_token: float, bandwidth: float) -> tuple[float, float]:
    """(bound in tokens/s, fraction of it reached)."""
    bound = bandwidth / bytes_per_token
    return bound, tokens_per_s / bound
