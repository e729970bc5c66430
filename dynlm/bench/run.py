"""`dynlm bench`: build the workloads, time them, probe memory, write bench.json and the table."""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch

from ..config import Config, to_dict
from ..textio import write_json
from ..device import resolve_device
from ..roofline import triad_bandwidth
from .memory import run_memory_probes
from .profile import check_profiled_rows, profile_rows
from .report import _bound, _threads, _vs_static_eval, git_info, machine_info, markdown, ratios
from .workloads import Bench, build_workloads, check_bench_config, time_workloads, uses_bf16

def run_bench(cfg: Config, out: Path) -> dict:
    """Measure, print the tables, write `out` (JSON); returns the result."""
    check_bench_config(cfg)
    device = resolve_device(cfg.bench.device)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
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
        check_profiled_rows(b.profile, [w.name for w in workloads])
        phases = {"setup": time.perf_counter() - start}
        time_workloads(workloads, bench, b.repeats, b.warmup)
        phases["throughput"] = time.perf_counter() - start - sum(phases.values())
        profiles = profile_rows(workloads, b.profile, b.profile_calls, bench, Path(out).parent) if b.profile else {}
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
              "throughput": throughput, "memory": memory, "profiles": profiles,
              "ratios": ratios(throughput, memory_rows, cfg.eval.segment_length, cfg.bench.short_segment),
              "seconds": {**phases, "total": time.perf_counter() - start}}
    table = markdown(result)
    result["table"] = table
    print("\n" + table, flush=True)
    out = Path(out)
    write_json(out, result)  # strict JSON: a non-finite measurement is null
    print(f"\nwrote {out} ({result['seconds']['total']:.0f} s)")
    return result
