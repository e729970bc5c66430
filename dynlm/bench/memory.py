"""Peak memory of one meta-step per unroll length, each measured in a fresh process."""
from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

from ..config import Config, from_dict, to_dict
from ..rules import make_rule
from ..unroll import Stepper, TruncatedUnroll
from .workloads import Bench, meta_step

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
        ctx.set_forkserver_preload(["dynlm.bench.memory", "torch._dynamo"])  # torch.optim imports torch._dynamo
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
