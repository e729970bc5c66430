import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only add contention

REPO = Path(__file__).resolve().parents[1]
WIKITEXT2 = Path(os.environ.get("DYNLM_WIKITEXT2", REPO.parent / "shared" / "data" / "wikitext-2"))

# A corpus and model small enough that a whole train/evaluate run takes seconds.
TINY = [
    "data.synthetic.n_train=12", "data.synthetic.n_valid=3", "data.synthetic.n_test=3",
    "data.synthetic.min_tokens=100", "data.synthetic.max_tokens=300",
    "model.emb_size=16", "model.hidden_size=24", "train.batch_size=4", "train.bptt=10",
    "train.max_steps=20", "train.warmup_steps=5", "train.log_every=5", "train.eval_every=10",
    "eval.segment_length=10", "eval.batch_size=3", "log.wandb_mode=disabled",
]


# `python -c SLOW_CHILD DELAY dynlm-args...`: the CLI in a child process whose every training step
# sleeps DELAY seconds (a run callback), so a signal or a kill reliably lands part-way; torch runs on
# one thread as in the tests' own process, so results are bit-identical across the processes.
SLOW_CHILD = """
import sys, time, torch
torch.set_num_threads(1)
from dynlm.train.loop import Callback, callbacks
class Slow(Callback):
    def on_step_begin(self, state):
        time.sleep(float(sys.argv[1]))
from dynlm.cli import main
with callbacks(Slow()):
    code = main(sys.argv[2:])
sys.exit(code)
"""


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One tokenized-corpus cache per test module: its runs share the tokenization work."""
    return tmp_path_factory.mktemp("cache")


def pytest_collection_modifyitems(config, items):
    # DYNLM_TEST_DEVICE=cpu (the CPU smoke of `dynlm gpu-check`) runs the gpu tests on the CPU
    if torch.cuda.is_available() or os.environ.get("DYNLM_TEST_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs CUDA (or DYNLM_TEST_DEVICE=cpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# `torchrun` on a loaded 2-core machine: the two workers and the agent share the CPUs with whatever else
# runs, so a run that takes 20 s when idle can take several times that. The timeout only catches a hang.
TORCHRUN_TIMEOUT_S = float(os.environ.get("DYNLM_TORCHRUN_TIMEOUT_S", 1800))


def run_torchrun(args: list[str], log_dir, nproc: int = 2) -> str:
    """`python -m dynlm ARGS` in `nproc` gloo processes (torchrun --standalone: free ports, no fixed 29500).
    Each rank writes its own log files under `log_dir`, read back whole once the run is over: rank 0's
    stdout is returned, and a failure shows every rank's stderr, so the rank that failed first is seen
    (the combined output ends with the other rank's "Connection closed by peer")."""
    import subprocess
    import sys
    from pathlib import Path

    log_dir = Path(log_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "--log-dir", str(log_dir), "--redirects", "3", "-m", "dynlm", *args],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    logs = {int(d.name): d for d in log_dir.glob("*/attempt_*/*") if d.name.isdigit()}

    def read(rank: int, name: str) -> str:
        f = logs[rank] / name if rank in logs else None
        return f.read_text(encoding="utf-8", errors="replace") if f and f.is_file() else ""

    if p.returncode != 0:
        ranks = "\n".join(f"--- rank {r} stdout (end) ---\n{read(r, 'stdout.log')[-1500:]}\n"
                          f"--- rank {r} stderr ---\n{read(r, 'stderr.log')[-4000:]}" for r in sorted(logs))
        pytest.fail(f"torchrun exited {p.returncode}\n{ranks}\n--- torchrun ---\n{p.stderr[-2000:]}", pytrace=False)
    return read(0, "stdout.log")
