"""`dynlm bench`'s ratios, bounds and markdown table, and the machine it ran on."""
from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

from ..gitinfo import git_state
from ..roofline import fraction_of_bound
from .workloads import HEADLINE_RATIOS, Workload

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


def ratios(throughput: dict[str, dict], memory: list[dict], seg: int, short: int) -> dict:
    tps = {k: v["tokens_per_s"] for k, v in throughput.items()}

    def mem(k: int, ckpt: bool) -> float | None:
        return next((r["peak_mib"] for r in memory if r["unroll"] == k and r["checkpoint"] == ckpt), None)

    out = {
        "dyneval_vs_static_train": _ratio(tps.get(f"dyneval_seg{seg}"), tps["static_train"]),
        "learned_vs_dyneval": _ratio(tps.get(f"learned_ff_seg{seg}"), tps.get(f"dyneval_seg{seg}")),
        "learned_vs_dyneval_short": _ratio(tps.get(f"learned_ff_seg{short}"), tps.get(f"dyneval_seg{short}")),
        "learned_all_vs_dyneval_all": _ratio(tps.get(f"learned_all_seg{seg}"), tps.get(f"dyneval_all_seg{seg}")),
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
