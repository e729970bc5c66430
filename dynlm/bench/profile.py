"""`dynlm bench --bench.profile=[ROW,...]`: where a row's time goes, as torch.profiler's operator table.

The throughput table says how far a row is from its memory-traffic bound; this says why: each named
row's timed call is run `bench.profile_calls` times under torch.profiler (CPU, and CUDA when the bench
runs there), and the operators that took the most self time are written to profile_ROW.txt beside the
bench's JSON (and printed)."""
from __future__ import annotations

from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from ..config import ConfigError

ROW_LIMIT = 15  # operators per table: the few that matter, and the rest summed in torch's footer


def check_profiled_rows(names: list[str], rows: list[str]) -> None:
    """An unknown row name is a one-line error before any timing (rows: the workloads' names)."""
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise ConfigError(f"bench.profile: no row {unknown[0]!r}; rows: {', '.join(rows)}")


def profile_rows(workloads, names: list[str], calls: int, bench, out_dir: Path) -> dict[str, str]:
    """{row: path of its table}: each named workload's call, `calls` times, under torch.profiler."""
    paths = {}
    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for w in workloads:
        if w.name not in names:
            continue
        with profile(activities=activities) as prof:
            for _ in range(calls):
                w.call()
                bench.sync()
        table = prof.key_averages().table(sort_by=sort, row_limit=ROW_LIMIT)
        path = Path(out_dir) / f"profile_{w.name}.txt"
        path.write_text(f"# {w.label}: {calls} call(s) of {w.tokens_per_call} tokens, by self time\n{table}\n",
                        encoding="utf-8")
        print(f"\nprofile of {w.name} ({w.label}), {calls} call(s):\n{table}", flush=True)
        paths[w.name] = str(path)
    return paths
