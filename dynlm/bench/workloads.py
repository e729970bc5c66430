"""The timed workloads of `dynlm bench` (one call = one timed unit, through the code paths the real
commands use) and their measurement, taking turns repeat after repeat."""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

import torch
from torch import Tensor
from torch.utils import benchmark

from ..config import Config, ConfigError
from ..data.streams import Chunk
from ..device import autocast
from ..model import LSTMLM
from ..cache import CacheSettings, cache_step, empty_cache
from ..modes import parse_mode
from ..progress import progress
from ..rules import adapted_names, compute_grad_rms, make_rule
from ..rules.learned import COMPILE_MIN
from ..roofline import META_TRAFFIC, online_bytes_per_token
from ..train.meta import meta_parameters
from ..reader import Reader, as_dtype
from ..unroll import Stepper, TruncatedUnroll
from .reference import TorchLSTMLM

POOL_CHUNKS = 8  # distinct chunks per shape, read in turn
HEADLINE_RATIOS = ("dyneval_vs_static_train", "learned_vs_dyneval", "learned_vs_dyneval_short",
                   "learned_all_vs_dyneval_all", "metatrain_first_order_vs_static_train",
                   "memory_k64_vs_k4_checkpointed", "memory_k64_vs_k4_plain", "functional_vs_nn_lstm_train")


# ---- configuration checks -------------------------------------------------------------------------
def check_bench_config(cfg: Config) -> None:
    """ConfigError (exit code 2) for what no field's declaration (config/schema.py) can say: this machine's devices."""
    b = cfg.bench
    if b.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"bench.device={b.device} but CUDA is not available on this machine")


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.bench.precision == "bf16" or (cfg.bench.precision == "auto" and device.type == "cuda")


# ---- data -----------------------------------------------------------------------------------------
class ChunkPool:
    """Chunks of random tokens with a Zipfian unigram distribution (as word frequencies have, which
    matters for the adaptive softmax's tail clusters), every position a real target. It also has the
    `n_streams` / `len` / `chunk(i)` of a StreamLayout, so compute_grad_rms can read it."""

    def __init__(self, n_chunks: int, streams: int, length: int, vocab_size: int, seed: int, device):
        g = torch.Generator().manual_seed(seed)
        probs = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
        tokens = torch.multinomial(probs, n_chunks * streams * (length + 1), replacement=True, generator=g)
        tokens = tokens.view(n_chunks, streams, length + 1)
        self.n_streams, self.length = streams, length
        full = torch.ones(streams, length, dtype=torch.bool)
        self._chunks = [Chunk(inputs=t[:, :-1], targets=t[:, 1:], mask=full,
                              new_article=torch.zeros(streams, dtype=torch.bool),
                              article=torch.zeros(streams, length, dtype=torch.long),
                              position=torch.arange(length).expand(streams, length)).to(device) for t in tokens]
        self._next = 0

    def __len__(self) -> int:
        return len(self._chunks)

    def chunk(self, i: int) -> Chunk:
        return self._chunks[i % len(self._chunks)]

    def next(self) -> Chunk:
        self._next += 1
        return self.chunk(self._next - 1)

    @property
    def tokens_per_chunk(self) -> int:
        return self.n_streams * self.length


# ---- workloads: one call = one timed unit ---------------------------------------------------------
@dataclasses.dataclass
class Workload:
    name: str  # JSON key
    label: str  # table row
    kind: str  # static train | static eval | online eval | metatrain
    segment_length: int
    tokens_per_call: int
    call: Callable[[], None]
    notes: str = ""
    compiled: bool = False  # the learned rule's update goes through torch.compile
    after_warmup: Callable[["Workload"], None] | None = None  # e.g. check that torch.compile took
    first_call_s: float | None = None
    seconds: list[float] = dataclasses.field(default_factory=list)
    bytes_per_token: float | None = None  # the least memory traffic the workload needs (roofline.py)

    def tokens_per_s(self) -> float:
        return self.tokens_per_call / statistics.median(self.seconds)

    def compile_s(self) -> float | None:
        """The first call's time beyond a timed call's: mostly torch.compile."""
        if not self.compiled or self.first_call_s is None:
            return None
        return max(0.0, self.first_call_s - statistics.median(self.seconds))


class Bench:
    """The model, its weights and the data every workload shares."""

    def __init__(self, cfg: Config, device: torch.device, streams: int):
        self.cfg, self.device, self.streams = cfg, device, streams
        self.bf16 = uses_bf16(cfg, device)
        self.lm = LSTMLM(cfg.model, cfg.bench.vocab_size)
        self.params = self.lm.init_params(cfg.bench.seed, device=device)
        self.names = adapted_names(self.lm, cfg.rule, "learned", self.params)
        self._pools: dict[int, ChunkPool] = {}

    def pool(self, length: int) -> ChunkPool:
        if length not in self._pools:
            self._pools[length] = ChunkPool(POOL_CHUNKS, self.streams, length, self.cfg.bench.vocab_size,
                                            self.cfg.bench.seed + length, self.device)
        return self._pools[length]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compiles(self, rule_cfg) -> bool:
        """Whether LearnedRule.fused() applies to at least one adapted tensor at this batch size."""
        return (rule_cfg.compile and rule_cfg.learner_hidden == 0
                and any(self.streams * self.params[k].numel() >= COMPILE_MIN for k in self.names))

    # -- static training: the step of train/static.py ----------------------------------------------
    def static_train(self, name: str, label: str, model: str) -> Workload:
        cfg, length = self.cfg, self.cfg.eval.segment_length
        pool = self.pool(length)
        if model == "functional":
            params = {k: v.detach().clone().requires_grad_() for k, v in self.params.items()}
            trained = list(params.values())

            def forward(tokens, targets, state):
                out, state = self.lm.hidden(params, tokens, state, train=True)
                return self.lm.nll(params, out, targets), state
        else:
            module = TorchLSTMLM(self.lm, self.params)
            trained = list(module.parameters())

            def forward(tokens, targets, state):
                out, state = module.hidden(tokens, state, train=True)
                return module.nll(out, targets), state
        opt = torch.optim.AdamW(trained, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        state = [self.lm.init_state(self.streams, device=self.device)]

        def call():
            chunk = pool.next()
            hidden = [(h.detach(), c.detach()) for h, c in state[0]]  # truncated BPTT
            with autocast(self.device, self.bf16):
                nll, hidden = forward(chunk.inputs, chunk.targets, hidden)
            loss = (nll * chunk.mask).sum() / chunk.mask.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.train.clip)
            if math.isfinite(float(grad_norm)):  # the fault guard's check (a device sync, as in training)
                opt.step()
            state[0] = as_dtype(hidden, torch.float32)  # autocast's bf16 back, as train/static.py does

        notes = "weight_drop not applied" if model == "nn" and cfg.model.weight_drop > 0 else ""
        return Workload(name, label, "static train", length, pool.tokens_per_chunk * cfg.bench.steps,
                        _repeat(call, cfg.bench.steps), notes=notes)

    # -- evaluation: the Stepper as prequential.score uses it ---------------------------------------------
    def online(self, name: str, label: str, mode: str, length: int, rule_cfg=None, ms=None) -> Workload:
        """mode: a mode name (modes.py), e.g. `dyneval@all` or `learned+cache`: its rule on the weights it
        adapts, and with `+cache` the neural cache over the adapted model's hidden states."""
        rule_cfg = rule_cfg or self.cfg.rule
        spec = parse_mode(mode)
        pool = self.pool(length)
        names = adapted_names(self.lm, rule_cfg, spec.rule, self.params, spec.weights)
        ms = {k: ms[k] for k in names} if spec.rule == "dyneval" else None
        rule = make_rule(spec.rule, rule_cfg, names, ms=ms).to(self.device)
        stepper = Stepper(self.lm, self.params, {k: self.params[k] for k in names}, rule, bf16=self.bf16)
        reader = [stepper.start(self.streams, self.device)]
        settings = CacheSettings.from_config(rule_cfg) if spec.cache else None
        memory = [empty_cache(self.streams, settings.window, self.lm.sizes[-1], self.device, stepper.dtype)] \
            if spec.cache else None

        def call():
            chunk = pool.next()
            nll, reader[0], stats = stepper.step(reader[0], chunk)
            if memory is not None:  # as prequential.score mixes it in
                _, memory[0] = cache_step(memory[0], stats["out"], nll, chunk.targets, chunk.mask, settings)

        compiled = spec.rule == "learned" and self.compiles(rule_cfg)
        kind = "static eval" if mode == "static" else "online eval"
        least = online_bytes_per_token(self.params, names, reader[0].rule_state, self.streams, length,
                                       shared_state=1 if spec.rule == "dyneval" else 0)
        return Workload(name, label, kind, length, pool.tokens_per_chunk * self.cfg.bench.steps,
                        _repeat(call, self.cfg.bench.steps), compiled=compiled,
                        after_warmup=_check_compiled(rule) if compiled else None, bytes_per_token=least)

    # -- meta-training: the meta-step of train/meta.py ----------------------------------------------
    def metatrain(self, name: str, label: str, second_order: bool, checkpoint: bool, rule_cfg=None) -> Workload:
        """One call = one meta-step (unroll.TruncatedUnroll): the previous step's held-back update
        replayed, meta.unroll chunk_steps with meta=True, backward, clip, Adam on the
        learner (and on theta0 / the static weights when meta.theta0_lr / meta.static_lr > 0),
        truncation. dynlm metatrain also scores the static model on each chunk for its logs; that
        forward pass is not part of this workload."""
        cfg, m, length = self.cfg, self.cfg.meta, self.cfg.eval.segment_length
        rule_cfg = rule_cfg or cfg.rule
        pool = self.pool(length)
        rule = make_rule("learned", rule_cfg, self.names).to(self.device)
        static, theta0, opt, trained = meta_parameters(self.params, self.names, rule, m, self.device)
        unroll = TruncatedUnroll(Stepper(self.lm, static, theta0, rule, meta=True, second_order=second_order,
                                         checkpoint=checkpoint), m.unroll)
        reader = [unroll.start(self.streams, self.device)]

        def call():
            reader[0] = meta_step(unroll, reader[0], pool, opt, trained, m.clip)

        compiled = self.compiles(rule_cfg)
        notes = f"K={m.unroll}, learned {rule_cfg.learner}, hidden {rule_cfg.learner_hidden}" + (
            ", compiled" if compiled else "") + (", fp32: dynlm metatrain does not autocast" if self.bf16 else "")
        least = META_TRAFFIC[second_order] * online_bytes_per_token(self.params, self.names, reader[0].rule_state,
                                                                    self.streams, length)
        return Workload(name, label, "metatrain", length, pool.tokens_per_chunk * m.unroll, call, notes=notes,
                        compiled=compiled, after_warmup=_check_compiled(rule) if compiled else None,
                        bytes_per_token=least)


def meta_step(unroll: TruncatedUnroll, reader: Reader, pool: ChunkPool, opt, trained: list[Tensor],
              clip: float) -> Reader:
    """K prequential chunk steps with the graph kept (unroll.TruncatedUnroll, as dynlm metatrain runs
    them), the summed loss back-propagated, one outer step; returns the truncated reader."""
    step = unroll(reader, (pool.next() for _ in range(unroll.k)))
    loss = step.nll / max(step.tokens, 1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, clip)
    if math.isfinite(float(grad_norm)):
        opt.step()
    return step.reader


def _repeat(fn: Callable[[], None], times: int) -> Callable[[], None]:
    def call():
        for _ in range(times):
            fn()
    return call


def _check_compiled(rule) -> Callable[[Workload], None]:
    """After warm-up: say so in the row when torch.compile failed and the rule fell back to eager."""
    def check(w: Workload) -> None:
        if getattr(rule, "_compiled", None) is None:
            w.notes = (w.notes.replace(", compiled", "") + "; " if w.notes else "") + "torch.compile failed: ran eager"
            w.label = w.label.replace(" (compiled)", "")
            w.compiled = False
    return check


# ---- the measurement ------------------------------------------------------------------------------
def build_workloads(bench: Bench) -> list[Workload]:
    cfg = bench.cfg
    seg, short = cfg.eval.segment_length, cfg.bench.short_segment
    rule = cfg.rule
    ff = dataclasses.replace(rule, learner="ff", learner_hidden=0)
    # rnn runs eager: compiling its update costs ~50 s on a CPU, more than the rest of the bench; the ff
    # rows show what compiling buys
    rnn = dataclasses.replace(rule, learner="rnn", learner_hidden=0, compile=False)
    ff_eager = dataclasses.replace(ff, compile=False)
    ff_hidden = dataclasses.replace(rule, learner="ff", learner_hidden=cfg.bench.learner_hidden)
    hidden_n = cfg.bench.learner_hidden

    def tag(rule_cfg) -> str:
        return " (compiled)" if bench.compiles(rule_cfg) else ""

    # dyneval's MS statistics (every weight: dyneval@lstm takes its subset); their values do not change
    # the speed, so the pool's chunks serve
    all_names = adapted_names(bench.lm, rule, "dyneval", bench.params, "all")
    ms = compute_grad_rms(bench.lm, bench.params, bench.pool(seg), all_names, POOL_CHUNKS, bench.device)
    one = Bench(bench.cfg, bench.device, 1)  # Krause's protocol reads one stream

    w = [bench.static_train("static_train", "static training (functional, fused LSTM)", "functional"),
         bench.static_train("nn_lstm_train", "static training (nn.Embedding + nn.LSTM)", "nn")]
    for length in dict.fromkeys((seg, short)):  # dict: once when they are equal
        s = f"_seg{length}"
        w.append(bench.online("static_eval" + s, "static evaluation", "static", length))
        w.append(bench.online("sgd" + s, "online sgd", "sgd", length))
        w.append(bench.online("dyneval" + s, "online dyneval, LSTM weights", "dyneval@lstm", length, ms=ms))
        w.append(bench.online("dyneval_all" + s, "online dyneval, all weights (sparse embedding rows)", "dyneval@all",
                              length, ms=ms))
        w.append(bench.online("adam" + s, "online adam control, LSTM weights", "adam", length))
        w.append(bench.online("learned_ff" + s, "online learned ff" + tag(ff), "learned", length, ff))
        if bench.compiles(ff):
            w.append(bench.online("learned_ff_eager" + s, "online learned ff (eager)", "learned", length, ff_eager))
        w.append(bench.online("learned_rnn" + s, "online learned rnn (eager)", "learned", length, rnn))
        w.append(bench.online(f"learned_ff_hidden{hidden_n}" + s, f"online learned ff, hidden {hidden_n}",
                              "learned", length, ff_hidden))
        # every weight, per stream: the adam control updates touched embedding rows only, the learned rule
        # every row (its gates read each coordinate's drift, which has no closed form over skipped segments)
        w.append(bench.online("adam_all" + s, "online adam control, all weights (sparse embedding rows)", "adam@all",
                              length))
        w.append(bench.online("learned_all" + s, "online learned ff, all weights" + tag(ff), "learned@all", length, ff))
    w.append(bench.online(f"learned_ff_cache_seg{seg}", "online learned ff + cache" + tag(ff), "learned+cache", seg, ff))
    # Krause's protocol: one stream, segments of `short`, every weight
    w.append(one.online(f"static_eval_1stream_seg{short}", "static evaluation, 1 stream", "static", short))
    w.append(one.online(f"dyneval_all_1stream_seg{short}", "online dyneval, all weights, 1 stream", "dyneval@all",
                        short, ms=ms))
    for order in ("first", "second"):
        for ckpt in (False, True):
            w.append(bench.metatrain(f"metatrain_{order}_order" + ("_checkpointed" if ckpt else ""),
                                     f"meta-training, {order}-order" + (", checkpointed" if ckpt else ""),
                                     order == "second", ckpt))
    return w


def time_workloads(workloads: list[Workload], bench: Bench, repeats: int, warmup: int) -> None:
    """Warm each up, then time them in turns: repeat r of every workload before repeat r + 1 of any, so
    that a load that changes during the run (a shared machine) weighs on every row alike.

    A timed repeat is torch.utils.benchmark's Timer.timeit(1): it sets the thread count, runs its own
    two warm-up calls and synchronises the accelerator around the timed call. Compiled workloads get one
    more warm-up call of ours: torch.compile specialises its first graph to the streams' fresh state
    (weights still a stride-0 view of theta0) and recompiles for the next one."""
    for w in workloads:
        for i in range(warmup + (1 if warmup and w.compiled else 0)):
            bench.sync()
            start = time.perf_counter()
            w.call()
            bench.sync()
            if i == 0:
                w.first_call_s = time.perf_counter() - start
        if w.after_warmup:
            w.after_warmup(w)
        first = f" in {w.first_call_s:.1f} s" if w.first_call_s is not None else ""
        print(f"warmed up {w.name}{first}", flush=True)
    threads = torch.get_num_threads()
    timers = [benchmark.Timer("call()", globals={"call": w.call}, num_threads=threads, label=w.label)
              for w in workloads]
    with progress(total=repeats * len(workloads), desc="timing", mininterval=1) as bar:
        for _ in range(repeats):
            for w, timer in zip(workloads, timers):
                w.seconds.append(timer.timeit(1).median)
                bar.update()
    for w in workloads:
        print(f"{w.name:<44} {w.tokens_per_s():>10,.0f} tokens/s  (median of {repeats})", flush=True)
