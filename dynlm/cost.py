"""Expected cost of an experiment's training stages at their configured sizes, extrapolated from a
short run: `dynlm experiment NAME --scale paper --estimate`.

The paper-scale stages need a GPU this project may not have, so their cost is measured where it can
be, on a short run of the real-size model on CPU, and scaled to the configured batch and lengths:

- compute: matmul FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` on short runs (parts
  per token, per stream and shared, fitted exactly), scaled to the configured sizes, and
  turned into tokens/s at an assumed sustained GPU throughput (`--estimate-tflops`);
- memory traffic: the bytes every op reads and writes (views excluded), counted on the same runs,
  turned into tokens/s at an assumed sustained bandwidth (`--estimate-bandwidth`). Per-stream fast
  weights make meta-training memory-bound: each stream reads its own recurrent matrices at every
  token and nothing is shared across the batch; the estimate is the slower of the two;
- memory: the bytes autograd saves for backward (every saved tensor's storage, counted once), on the
  same runs, plus weights, gradients and optimizer state; float32 (bf16 autocast keeps
  some activations at half that: an upper bound). A checkpointed meta-step keeps each chunk step's
  inputs (every stream's fast weights, rule state, hidden state and inner gradient) plus one step's
  activations while it is recomputed. Meta-training also keeps, from one meta-step to the next, the
  last chunk's update held back at truncation (its fast weights, inner gradient and rule state per
  stream), replayed in the next step's graph.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .config import Config
from .data.streams import Chunk
from .model import LSTMLM
from .rules import adapted_names, make_rule
from .unroll import Stepper, TruncatedUnroll

GIB = 2**30
PROBE_LENGTHS = (4, 8)  # tokens per stream in the two short runs the linear fits go through


@dataclass
class Measured:
    flops: float  # matmul FLOPs, forward + backward
    saved_bytes: int  # what autograd keeps for backward
    traffic_bytes: float = 0.0  # what the ops read and write


def _bytes(t: torch.Tensor) -> int:
    """What reading t moves: its elements, but no more than its storage (a stride-0 expand reads the base)."""
    return min(t.nbytes, t.untyped_storage().nbytes())


class TrafficCounter(TorchDispatchMode):
    """Sums the bytes of every op's tensor inputs and outputs; a view (an output sharing an input's
    storage) moves nothing."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        storages = {t.untyped_storage().data_ptr() for t in ins}
        if not (outs and all(t.untyped_storage().data_ptr() in storages for t in outs)):  # not a view
            self.bytes += sum(_bytes(t) for t in ins) + sum(_bytes(t) for t in outs)
        return out


def measure(fn) -> Measured:
    """FLOPs, saved-for-backward bytes and memory traffic of fn() (a forward and its backward)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            s = t.untyped_storage()
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    counter, traffic = FlopCounterMode(display=False), TrafficCounter()
    with counter, traffic, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return Measured(float(counter.get_total_flops()), sum(storages.values()), float(traffic.bytes))


def _tokens(batch: int, length: int, vocab: int, seed: int = 0) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, vocab, (batch, length + 1), generator=g)
    return Chunk(tok[:, :-1], tok[:, 1:], torch.ones(batch, length, dtype=torch.bool),
                 torch.zeros(batch, dtype=torch.bool), torch.zeros(batch, length, dtype=torch.long),
                 torch.arange(length).expand(batch, length))


def _per_token(short: Measured, long: Measured) -> Measured:
    span = PROBE_LENGTHS[1] - PROBE_LENGTHS[0]
    return Measured((long.flops - short.flops) / span, int((long.saved_bytes - short.saved_bytes) / span),
                    (long.traffic_bytes - short.traffic_bytes) / span)


def _minus(a: Measured, b: Measured, times: float = 1.0) -> Measured:
    return Measured(max(0.0, a.flops - times * b.flops), max(0, int(a.saved_bytes - times * b.saved_bytes)),
                    max(0.0, a.traffic_bytes - times * b.traffic_bytes))


def static_training_cost(cfg: Config, vocab: int) -> dict:
    """One static training step of train.batch_size x train.bptt tokens (AdamW, fp32 master weights)."""
    lm = LSTMLM(cfg.model, vocab)
    lm.fuse_single_stream = False  # count the per-stream ops one stream at a time (fused kernels hide them)
    params = {k: v.requires_grad_() for k, v in lm.init_params(seed=0).items()}

    def step(length: int) -> Measured:
        def run(per_stream: bool):
            chunk = _tokens(1, length, vocab)
            # per_stream: the LSTM weights as one stream's copy, the same matmuls written as ops the FLOP
            # counter sees (the fused nn.LSTM kernel is opaque to it); the fused kernel, which reads the
            # shared weights once for the whole batch, gives the memory traffic and what is saved
            weights = {**params, **{k: params[k].unsqueeze(0) for k in lm.lstm_names()}} if per_stream else params
            out, _ = lm.hidden(weights, chunk.inputs, lm.init_state(1), train=True)
            lm.nll(weights, out, chunk.targets).mean().backward()
        fused = measure(lambda: run(False))
        return Measured(measure(lambda: run(True)).flops, fused.saved_bytes, fused.traffic_bytes)

    short, long = (step(n) for n in PROBE_LENGTHS)
    per_token = _per_token(short, long)
    shared = _minus(short, per_token, PROBE_LENGTHS[0])  # weights saved once per step, whatever the batch
    n_params = sum(p.numel() for p in params.values())
    tokens = cfg.train.batch_size * cfg.train.bptt
    return {"stage": "static training", "n_params": n_params, "tokens_per_step": tokens,
            "flops_per_token": per_token.flops + shared.flops / tokens,
            "traffic_per_token": per_token.traffic_bytes + shared.traffic_bytes / tokens,
            "memory_bytes": 16 * n_params + shared.saved_bytes + per_token.saved_bytes * tokens,
            "memory_note": "weights + grads + AdamW moments (fp32) + saved activations"}


def meta_training_cost(cfg: Config, vocab: int) -> dict:
    """One meta-step: meta.batch_size streams x meta.unroll chunk steps of eval.segment_length tokens. Unrolls of
    1 and 2 steps are measured at (1 stream, 4 tokens), (1, 8) and (2, 4): a part per token, one per
    stream (its weight copies) and one shared by all streams and steps (the static weights, saved once)."""
    m, chunk = cfg.meta, cfg.eval.segment_length
    rule_cfg = copy.deepcopy(cfg.rule)
    rule_cfg.compile = False  # compilation changes neither the FLOPs nor what is saved
    lm = LSTMLM(cfg.model, vocab)
    lm.fuse_single_stream = False  # count the per-stream ops one stream at a time (fused kernels hide them)
    params = lm.init_params(seed=0)
    names = adapted_names(lm, rule_cfg, "learned", params)
    rule = make_rule("learned", rule_cfg, names)
    theta0 = {k: params[k] for k in names}
    static = {k: v for k, v in params.items() if k not in names}
    carried = {}

    def unroll(streams: int, length: int, k: int) -> Measured:
        def run():
            unroll = TruncatedUnroll(Stepper(lm, static, theta0, rule, meta=True, second_order=m.second_order), k)
            step = unroll(None, [_tokens(streams, length, vocab, seed=i) for i in range(k)])
            (step.nll / step.tokens).backward()
            reader = step.reader
            # what a checkpointed step keeps per stream: its inputs, and the inner gradient (fast weights' size)
            state = [*reader.fast.values(), *reader.rule_state.values(), *[t for hc in reader.hidden for t in hc]]
            carried[streams] = (sum(t.nbytes for t in state) + sum(t.nbytes for t in reader.fast.values())) / streams
        return measure(run)

    def parts(cost) -> tuple[Measured, Measured, Measured]:
        """(per token, per stream, shared) parts of a cost measured at (1, 4), (1, 8) and (2, 4)."""
        short, long, two = cost(1, PROBE_LENGTHS[0]), cost(1, PROBE_LENGTHS[1]), cost(2, PROBE_LENGTHS[0])
        per_token = _per_token(short, long)
        per_stream = _minus(_minus(two, short), per_token, PROBE_LENGTHS[0])
        return per_token, per_stream, _minus(_minus(short, per_stream), per_token, PROBE_LENGTHS[0])

    # a chunk step inside an unroll (K=2 minus K=1): its forward, inner gradient and update, and the
    # backward through all of them (in second order, through the inner gradient too)
    step_token, step_stream, step_shared = parts(lambda b, n: _minus(unroll(b, n, 2), unroll(b, n, 1)))
    _, _, shared = parts(lambda b, n: unroll(b, n, 1))  # the static weights, saved once
    per_stream_step = Measured(step_stream.flops + step_token.flops * chunk,
                               int(step_stream.saved_bytes + step_token.saved_bytes * chunk),
                               step_stream.traffic_bytes + step_token.traffic_bytes * chunk)
    step_bytes = per_stream_step.saved_bytes
    steps = m.batch_size * m.unroll
    weights = 4 * sum(p.numel() for p in params.values()) + 16 * sum(p.numel() for p in rule.parameters())
    if m.theta0_lr > 0:
        weights += 12 * sum(theta0[k].numel() for k in names)
    activations = shared.saved_bytes + (step_bytes * m.batch_size + carried[1] * steps if m.checkpoint
                                        else step_bytes * steps)
    activations += carried[1] * m.batch_size  # the update held back at truncation, replayed in the next step
    recompute = 4 / 3 if m.checkpoint else 1.0  # a checkpoint runs each forward twice (forward ~ 1/3 of fwd + bwd)
    flops = (per_stream_step.flops * steps + step_shared.flops * m.unroll) * recompute
    traffic = (per_stream_step.traffic_bytes * steps + step_shared.traffic_bytes * m.unroll) * recompute
    tokens = steps * chunk
    return {"stage": f"meta-training ({'second' if m.second_order else 'first'}-order, K={m.unroll}"
                     f"{', checkpointed' if m.checkpoint else ''})",
            "n_params": sum(p.numel() for p in params.values()), "tokens_per_step": tokens,
            "flops_per_token": flops / tokens, "traffic_per_token": traffic / tokens,
            "memory_bytes": weights + activations,
            "memory_note": ("weights + each chunk step's inputs per stream (fast weights, rule state, hidden, inner "
                            "gradient) + one step's activations" if m.checkpoint else
                            "weights + every chunk step's saved activations and weight copies")
                           + " + the update held back at truncation"}


def expected_rates(cost: dict, tflops: float, bandwidth_tb_s: float) -> tuple[float, float]:
    """(tokens/s bound by compute, tokens/s bound by memory traffic) of a stage's cost at the assumed rates."""
    by_compute = tflops * 1e12 / cost["flops_per_token"]
    by_traffic = bandwidth_tb_s * 1e12 / cost["traffic_per_token"] if cost["traffic_per_token"] else float("inf")
    return by_compute, by_traffic


def format_costs(costs: list[dict], tflops: float, bandwidth_tb_s: float) -> str:
    lines = [f"| stage | parameters | tokens/step | GFLOP/token | MB moved/token | expected tokens/s at {tflops:g} TFLOP/s "
             f"and {bandwidth_tb_s:g} TB/s | bound by | expected memory (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for c in costs:
        by_compute, by_traffic = expected_rates(c, tflops, bandwidth_tb_s)
        lines.append(f"| {c['stage']} | {c['n_params'] / 1e6:.1f}M | {c['tokens_per_step']:,} | "
                     f"{c['flops_per_token'] / 1e9:.3g} | {c['traffic_per_token'] / 1e6:,.0f} | "
                     f"{min(by_compute, by_traffic):,.0f} | {'compute' if by_compute <= by_traffic else 'memory traffic'} "
                     f"| {c['memory_bytes'] / GIB:.1f} |")
    notes = sorted({f"- {c['stage']}: memory = {c['memory_note']}" for c in costs})
    return "\n".join(lines + [""] + notes)
