"""`dynlm bench`: what online adaptation and meta-training cost next to static training.

Every measurement runs in one process on one model (`model.*`), one batch shape (`bench.batch_size`
streams, `eval.segment_length`-token chunks) and the same random tokens, through the code paths the
real commands use: the static training step, `unroll.Stepper` for evaluation (every rule) and
`unroll.TruncatedUnroll` for meta-training (K = `meta.unroll` chunk steps with meta=True, the held-back
update of the previous meta-step replayed first, then backward and the outer optimizer step).
After `bench.warmup` untimed calls (where torch.compile compiles; their time is reported), the
measurements take turns, repeat after repeat, so that a load change on a shared machine hits all of
them alike; each reports the median of `bench.repeats` repeats. Peak memory of one meta-step is
measured per unroll length in a fresh process each.

Throughput is reported as ratios against static training: absolute tokens/s depend on the machine,
the ratios are what the performance targets are stated in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, ConfigError, from_dict, to_dict
from .data.streams import Chunk
from .textio import write_json
from .device import autocast, resolve_device
from .gitinfo import git_state
from .model import LSTMLM, Params, State
from .model.regularizers import embedding_dropout, locked_dropout
from .cache import CacheSettings, cache_step, empty_cache
from .modes import parse_mode
from .progress import progress
from .rules import adapted_names, compute_grad_rms, make_rule
from .rules.learned import COMPILE_MIN
from .roofline import META_TRAFFIC, fraction_of_bound, online_bytes_per_token, triad_bandwidth
from .train.meta import meta_parameters
from .unroll import Reader, Stepper, TruncatedUnroll, as_dtype

POOL_CHUNKS = 8  # distinct chunks per shape, read in turn
HEADLINE_RATIOS = ("dyneval_vs_static_train", "learned_vs_dyneval", "metatrain_first_order_vs_static_train",
                   "memory_k64_vs_k4_checkpointed", "memory_k64_vs_k4_plain", "functional_vs_nn_lstm_train")


# ---- configuration checks -------------------------------------------------------------------------
def check_bench_config(cfg: Config) -> None:
    """ConfigError (exit code 2) for what no field's declaration (config.py) can say: this machine's devices."""
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


# ---- the nn.LSTM reference model ------------------------------------------------------------------
class TorchLSTMLM(nn.Module):
    """The functional LSTMLM built from stock modules: nn.Embedding, one nn.LSTM per layer (with its
    two biases; bias_hh starts at 0), the same regularisers and the same softmax code (LSTMLM.nll on
    this module's tensors). The reference for `functional_vs_nn_lstm_train`. model.weight_drop is
    not applied (nn.LSTM has no DropConnect)."""

    def __init__(self, lm: LSTMLM, params: Params):
        super().__init__()
        self.lm = lm
        ref = params["embed"]
        self.embed = nn.Embedding(*ref.shape, device=ref.device, dtype=ref.dtype)
        self.layers = nn.ModuleList(nn.LSTM(n_in, n_h, batch_first=True, device=ref.device, dtype=ref.dtype)
                                    for n_in, n_h in zip(lm.inputs, lm.sizes))
        self._softmax_names = [k for k in params if k != "embed" and not k.startswith("lstm.")]
        self.softmax = nn.ParameterList(nn.Parameter(params[k].detach().clone()) for k in self._softmax_names)
        with torch.no_grad():
            self.embed.weight.copy_(ref)
            for l, layer in enumerate(self.layers):
                layer.weight_ih_l0.copy_(params[f"lstm.{l}.w_ih"])
                layer.weight_hh_l0.copy_(params[f"lstm.{l}.w_hh"])
                layer.bias_ih_l0.copy_(params[f"lstm.{l}.b"])
                layer.bias_hh_l0.zero_()

    def softmax_params(self) -> Params:
        return {"embed": self.embed.weight, **dict(zip(self._softmax_names, self.softmax))}

    def hidden(self, tokens: Tensor, state: State, train: bool = False) -> tuple[Tensor, State]:
        c = self.lm.cfg
        if train and c.dropout_emb > 0:
            x = F.embedding(tokens, embedding_dropout(self.embed.weight, c.dropout_emb))
        else:
            x = self.embed(tokens)
        x = locked_dropout(x, c.dropout_input, train)
        new_state = []
        for l, layer in enumerate(self.layers):
            h0, c0 = state[l]
            x, (h, cell) = layer(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
            new_state.append((h.squeeze(0), cell.squeeze(0)))
            x = locked_dropout(x, c.dropout_output if l == c.n_layers - 1 else c.dropout_hidden, train)
        return x, new_state

    def nll(self, out: Tensor, targets: Tensor) -> Tensor:
        return self.lm.nll(self.softmax_params(), out, targets)


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

    # -- evaluation: the Stepper as evaluate.score uses it ---------------------------------------------
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
            if memory is not None:  # as evaluate.score mixes it in
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
    """Warm each up, then time them in turns: repeat r of every workload before repeat r + 1 of any.

    Compiled workloads get one more warm-up call: torch.compile specialises its first graph to the
    streams' fresh state (weights still a stride-0 view of theta0) and recompiles for the next one."""
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
    with progress(total=repeats * len(workloads), desc="timing", mininterval=1) as bar:
        for _ in range(repeats):
            for w in workloads:
                bench.sync()
                start = time.perf_counter()
                w.call()
                bench.sync()
                w.seconds.append(time.perf_counter() - start)
                bar.update()
    for w in workloads:
        print(f"{w.name:<44} {w.tokens_per_s():>10,.0f} tokens/s  (median of {repeats})", flush=True)


# ---- memory probes (a fresh process each) ------------------------------------------------------
def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_baseline_bytes() -> int:
    """Start a fresh peak-RSS measurement; returns the baseline to subtract from peak_rss_bytes().

    Linux: reset the process's high-water mark to its current RSS (/proc/self/clear_refs) and read it
    back from /proc/self/status. getrusage's ru_maxrss cannot serve here: it cannot be reset, and a
    process started from a large one inherits the parent's peak at exec, so it would hide any step
    smaller than the bench process itself. Elsewhere: ru_maxrss before the step."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        hwm = _proc_status_bytes("VmHWM")
        if hwm is not None:
            return hwm
    except OSError:
        pass
    return _ru_maxrss_bytes()


def peak_rss_bytes() -> int:
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else _ru_maxrss_bytes()


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def release_freed_memory_to_the_os() -> None:
    """Make RSS follow the live tensors: glibc's malloc otherwise raises its mmap threshold after the
    first large frees and keeps freed tensors in a fragmented heap, so the peak RSS of a checkpointed
    unroll (many transient activations) looked as large as a plain one's. A fixed 64 KiB threshold
    serves every sizeable tensor from mmap, which goes back to the OS on free. No-op off glibc."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def memory_probe(cfg: Config, device: torch.device, unroll: int, checkpoint: bool) -> dict:
    """Peak memory of one meta-step of `unroll` chunk steps, above what the process held before it.

    Runs the eager learned rule (rule.compile=false): a fresh process would otherwise spend the
    compile time again for every probe."""
    rule_cfg = dataclasses.replace(cfg.rule, compile=False)
    m = cfg.meta
    if device.type == "cpu":
        release_freed_memory_to_the_os()

    def setup(streams: int):
        bench = Bench(cfg, device, streams)
        static = {k: v for k, v in bench.params.items() if k not in bench.names}
        theta0 = {k: bench.params[k].clone().requires_grad_(m.theta0_lr > 0) for k in bench.names}
        rule = make_rule("learned", rule_cfg, bench.names).to(device)
        trained = list(rule.parameters()) + (list(theta0.values()) if m.theta0_lr > 0 else [])
        opt = torch.optim.Adam(trained, lr=m.lr)

        def unroll(k: int, ckpt: bool) -> TruncatedUnroll:
            return TruncatedUnroll(Stepper(bench.lm, static, theta0, rule, meta=True, second_order=m.second_order,
                                           checkpoint=ckpt), k)
        reader = unroll(1, False).start(streams, device)

        def run(k: int, ckpt: bool) -> None:
            meta_step(unroll(k, ckpt), reader, bench.pool(cfg.eval.segment_length), opt, trained, m.clip)
        return run

    # thread pools, allocator arenas and kernel caches come up on one stream, before the baseline
    setup(1)(1, checkpoint)
    run = setup(cfg.bench.memory_batch_size)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = rss_baseline_bytes()
    start = time.perf_counter()
    run(unroll, checkpoint)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss_bytes()
    return {"unroll": unroll, "checkpoint": checkpoint, "peak_mib": (peak - baseline) / 2**20,
            "baseline_mib": baseline / 2**20, "seconds": time.perf_counter() - start}


def _probe_child(spec: dict, conn) -> None:
    """One memory probe, in a process of its own; the result (or the error) goes back through `conn`."""
    try:
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        cfg = from_dict(Config, spec["config"])
        conn.send(memory_probe(cfg, torch.device(spec["device"]), spec["unroll"], spec["checkpoint"]))
    except Exception as e:
        conn.send({"error": f"{type(e).__name__}: {e}"[:300]})
    finally:
        conn.close()


def _probe_context(device: torch.device):
    """Processes forked from a server that has imported torch once (a bare interpreter per probe would
    spend seconds importing it again each time) but never run anything; spawn where fork is missing,
    and on CUDA (a forked child cannot use CUDA once the bench's own process has: the GPU check found
    every probe failing so)."""
    if device.type != "cuda" and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["dynlm.bench", "torch._dynamo"])  # torch.optim imports torch._dynamo
        return ctx
    return multiprocessing.get_context("spawn")


def _probe(ctx, cfg: Config, device: torch.device, unroll: int, checkpoint: bool) -> dict:
    spec = {"config": to_dict(cfg), "device": str(device), "unroll": unroll, "checkpoint": checkpoint,
            "threads": torch.get_num_threads()}
    failed = {"unroll": unroll, "checkpoint": checkpoint, "peak_mib": None}
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe_child, args=(spec, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not receive.poll(cfg.bench.memory_timeout_s):
            proc.kill()
            return {**failed, "error": f"timed out after {cfg.bench.memory_timeout_s:g} s"}
        result = receive.recv()
    except EOFError:  # died without a word, e.g. killed for memory
        proc.join()
        return {**failed, "error": f"the probe process died (exit code {proc.exitcode})"}
    finally:
        receive.close()
        proc.join()
    return {**failed, **result} if "error" in result else result


def run_memory_probes(cfg: Config, device: torch.device) -> list[dict]:
    """Every (K, checkpointing) pair in a fresh process; on CPU bench.memory_parallel at a time
    (each measures its own RSS), on CUDA one at a time (they share the GPU)."""
    jobs = [(k, ckpt) for ckpt in (False, True) for k in cfg.bench.memory_unrolls]
    workers = 1 if device.type == "cuda" else cfg.bench.memory_parallel
    rows, ctx = {}, _probe_context(device)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_probe, ctx, cfg, device, k, ckpt): (k, ckpt) for k, ckpt in jobs}
        for future in as_completed(futures):
            k, ckpt = futures[future]
            row = rows[k, ckpt] = future.result()
            peak = f"{row['peak_mib']:,.1f} MiB" if row["peak_mib"] is not None else f"failed ({row['error']})"
            print(f"memory K={k:<3} {'checkpointed' if ckpt else 'plain':<12} {peak}", flush=True)
    return [rows[job] for job in jobs]


# ---- report ---------------------------------------------------------------------------------------
def _vs_static_eval(w: Workload, workloads: list[Workload]) -> float | None:
    """An online row's throughput against static evaluation of the same streams and segment length."""
    if w.kind != "online eval":
        return None
    ref = "static_eval" + ("_1stream" if "_1stream" in w.name else "") + f"_seg{w.segment_length}"
    base = next((x for x in workloads if x.name == ref), None)
    return w.tokens_per_s() / base.tokens_per_s() if base else None


def _bound(w: Workload, bandwidth: float) -> dict:
    """The workload's memory-traffic bound (roofline.py) and the fraction of it reached."""
    if w.bytes_per_token is None:
        return {"bytes_per_token": None, "bound_tokens_per_s": None, "of_bound": None}
    bound, frac = fraction_of_bound(w.tokens_per_s(), w.bytes_per_token, bandwidth)
    return {"bytes_per_token": w.bytes_per_token, "bound_tokens_per_s": bound, "of_bound": frac}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(throughput: dict[str, dict], memory: list[dict], seg: int) -> dict:
    tps = {k: v["tokens_per_s"] for k, v in throughput.items()}

    def mem(k: int, ckpt: bool) -> float | None:
        return next((r["peak_mib"] for r in memory if r["unroll"] == k and r["checkpoint"] == ckpt), None)

    out = {
        "dyneval_vs_static_train": _ratio(tps.get(f"dyneval_seg{seg}"), tps["static_train"]),
        "learned_vs_dyneval": _ratio(tps.get(f"learned_ff_seg{seg}"), tps.get(f"dyneval_seg{seg}")),
        "metatrain_first_order_vs_static_train": _ratio(tps.get("metatrain_first_order"), tps["static_train"]),
        "memory_k64_vs_k4_checkpointed": _ratio(mem(64, True), mem(4, True)),
        "memory_k64_vs_k4_plain": _ratio(mem(64, False), mem(4, False)),
        "functional_vs_nn_lstm_train": _ratio(tps["static_train"], tps.get("nn_lstm_train")),
    }
    out.update({f"{k}_vs_static_train": _ratio(v, tps["static_train"]) for k, v in tps.items() if k != "static_train"})
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Throughput: {s['streams']} streams, segment length {s['segment_length']} "
             f"(and {s['short_segment']}), meta-steps of K={s['unroll']} chunks; {s['device']}, "
             f"{s['precision']}, {s['threads']} thread(s); median of {s['repeats']} repeats.", "",
             f"Bound: the least memory traffic per token (dynlm/roofline.py) at the measured STREAM-triad bandwidth "
             f"of {s['bandwidth_gb_s']:,.1f} GB/s.", "",
             "| measurement | segment | tokens/s | × static training | × static evaluation | KB/token (least) "
             "| bound tokens/s | % of bound | compile (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["throughput"].values():
        note = f" ({row['notes']})" if row["notes"] else ""
        compile_s = f"{row['compile_s']:.1f}" if row["compile_s"] is not None else ""
        vs_eval = f"{row['vs_static_eval']:.3f}" if row.get("vs_static_eval") is not None else ""
        bound = (f"{row['bytes_per_token'] / 1e3:,.1f} | {row['bound_tokens_per_s']:,.0f} | {100 * row['of_bound']:.1f}"
                 if row.get("bytes_per_token") else " | | ")
        lines.append(f"| {row['label']}{note} | {row['segment_length']} | {row['tokens_per_s']:,.0f} | "
                     f"{row['vs_static_train']:.3f} | {vs_eval} | {bound} | {compile_s} |")
    mem = result["memory"]
    lines += ["", f"Peak memory of one {'second' if mem['second_order'] else 'first'}-order meta-step of K chunks "
              f"above the process's baseline ({mem['streams']} stream(s), {mem['measure']}):", "",
              "| K | plain (MiB) | checkpointed (MiB) |", "|---:|---:|---:|"]
    for k in mem["unrolls"]:
        cells = []
        for ckpt in (False, True):
            row = next(r for r in mem["rows"] if r["unroll"] == k and r["checkpoint"] == ckpt)
            cells.append(f"{row['peak_mib']:,.1f}" if row["peak_mib"] is not None else "failed")
        lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    for key in HEADLINE_RATIOS:
        v = result["ratios"][key]
        lines.append(f"| {key} | {v:.3f} |" if v is not None else f"| {key} | n/a |")
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": str(device), "cpu_model": _cpu_model()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_info() -> dict:
    commit, dirty = git_state()
    return {"commit": commit, "dirty": dirty}


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_bench(cfg: Config, out: Path) -> dict:
    """Measure, print the tables, write `out` (JSON); returns the result."""
    check_bench_config(cfg)
    device = resolve_device(cfg.bench.device)
    b = cfg.bench
    start = time.perf_counter()
    with _threads(b.threads):
        info = machine_info(device)
        bench = Bench(cfg, device, b.batch_size)
        n_params = sum(v.numel() for v in bench.params.values())
        print(f"dynlm bench: {n_params:,} parameters, vocab {b.vocab_size}, {b.batch_size} streams, segment "
              f"{cfg.eval.segment_length}/{b.short_segment}, K={cfg.meta.unroll}, {device}, "
              f"{torch.get_num_threads()} thread(s)", flush=True)
        workloads = build_workloads(bench)
        phases = {"setup": time.perf_counter() - start}
        time_workloads(workloads, bench, b.repeats, b.warmup)
        phases["throughput"] = time.perf_counter() - start - sum(phases.values())
        bandwidth = triad_bandwidth(device)
        print(f"memory bandwidth (STREAM triad): {bandwidth / 1e9:,.1f} GB/s", flush=True)
        static = next(w for w in workloads if w.name == "static_train").tokens_per_s()
        throughput = {w.name: {"label": w.label, "kind": w.kind, "segment_length": w.segment_length,
                               "tokens_per_s": w.tokens_per_s(), "vs_static_train": w.tokens_per_s() / static,
                               "vs_static_eval": _vs_static_eval(w, workloads), **_bound(w, bandwidth),
                               "first_call_s": w.first_call_s, "compile_s": w.compile_s(), "compiled": w.compiled,
                               "tokens_per_call": w.tokens_per_call, "seconds": w.seconds, "notes": w.notes}
                      for w in workloads}
        del workloads, bench  # free the readers and optimizers: the probes need the machine's memory
        gc.collect()
        memory_rows = run_memory_probes(cfg, device)
        phases["memory"] = time.perf_counter() - start - sum(phases.values())
        settings = {"streams": b.batch_size, "segment_length": cfg.eval.segment_length,
                    "short_segment": b.short_segment, "unroll": cfg.meta.unroll, "device": str(device),
                    "precision": "bf16 autocast" if uses_bf16(cfg, device) else "fp32",
                    "threads": torch.get_num_threads(), "repeats": b.repeats, "warmup": b.warmup,
                    "vocab_size": b.vocab_size, "parameters": n_params, "data": "random Zipfian tokens",
                    "bandwidth_gb_s": bandwidth / 1e9}
    measure = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
               else "peak RSS (VmHWM, reset just before the step) minus the RSS then")
    memory = {"streams": b.memory_batch_size, "unrolls": b.memory_unrolls, "rows": memory_rows,
              "measure": measure + ", eager learned rule", "second_order": cfg.meta.second_order}
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = os.getloadavg()
    result = {"machine": info, "git": git_info(), "settings": settings, "config": to_dict(cfg),
              "throughput": throughput, "memory": memory,
              "ratios": ratios(throughput, memory_rows, cfg.eval.segment_length),
              "seconds": {**phases, "total": time.perf_counter() - start}}
    table = markdown(result)
    result["table"] = table
    print("\n" + table, flush=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)  # strict JSON: a non-finite measurement is null
    print(f"\nwrote {out} ({result['seconds']['total']:.0f} s)")
    return result

