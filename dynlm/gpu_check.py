"""`dynlm gpu-check`: one prepared run that proves the CUDA, bf16 and multi-GPU paths in at most
`--minutes` (default 10), and reports what it found in one JSON and one markdown file.

A GPU is lent now and then, for minutes: this check exists beforehand, and its CPU smoke
(`--device cpu --tiny`) runs in the test suite so that it never rots. Stages, each with a share of
the budget and run in a subprocess killed at its time limit (so the whole run fits by construction;
a stage that overruns is reported as such and the next one starts):

1. tests: `pytest -m gpu tests/test_gpu.py` on the device: every kernel, rule, the cache and the
   second-order meta-gradient equal the CPU's; bf16 autocast perplexity close to float32.
2. pipeline: WikiText-2 at reduced paper scale (the paper's 3 x 1150 LSTM with WikiText-2's
   vocabulary): static training, meta-training and evaluation of every mode on a few articles, each
   with tokens/s and peak device memory next to what cost.py (`dynlm experiment --estimate`) predicts.
3. bench: `dynlm bench --device D`, with the memory-traffic bound column (roofline.py).
4. multi-GPU: with two or more GPUs visible, a 2-process torchrun of static training (NCCL) whose loss
   equals one process's.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from .textio import number, read_json, read_text, write_json

REPO = Path(__file__).resolve().parents[1]
# each stage's share of the time left when it starts (a stage that ends early leaves more to the next);
# SLACK of the budget is kept for start-up and the report
SHARES = {"tests": 0.2, "pipeline": 0.4, "bench": 0.3, "multi_gpu": 0.1}
SLACK = 0.04
PIPELINE_SHARES = {"train": 0.30, "metatrain": 0.25}  # of the pipeline's; evaluation takes what is left
MODES = "static,sgd,dyneval,dyneval@lstm,adam,cache,learned,learned+cache"

# reduced paper scale: wt103_paper_static.yaml + wt103_paper_meta.yaml's model and learner on WikiText-2
PAPER = ["--model.emb_size=400", "--model.hidden_size=1150", "--model.n_layers=3", "--model.softmax=full",
         "--model.dropout_input=0.1", "--model.dropout_hidden=0.1", "--model.dropout_output=0.1",
         "--model.weight_drop=0.1", "--train.batch_size=64", "--train.bptt=70", "--run.bf16=true",
         "--train.warmup_steps=100", "--train.eval_every=1000000", "--train.log_every=20", "--train.epochs=1",
         "--meta.unroll=4", "--meta.batch_size=8", "--meta.steps=100000", "--meta.log_every=5",
         "--meta.valid_articles=2", "--meta.checkpoint_every=100000", "--eval.segment_length=20",
         "--eval.batch_size=8", "--eval.max_articles=3", "--rule.grad_rms_chunks=100",
         "--rule.compile=false"]  # the tests and the bench compile the learned update; here it would eat the budget
TINY = ["--data.source=synthetic", "--data.synthetic.n_train=12", "--data.synthetic.n_valid=3",
        "--data.synthetic.n_test=3", "--data.synthetic.min_tokens=100", "--data.synthetic.max_tokens=300",
        "--model.emb_size=16", "--model.hidden_size=24", "--train.batch_size=4", "--train.bptt=10",
        "--train.max_steps=10", "--train.warmup_steps=2", "--train.log_every=5", "--train.eval_every=1000",
        "--meta.steps=3", "--meta.batch_size=2", "--meta.log_every=1", "--meta.valid_articles=1",
        "--eval.segment_length=10", "--eval.batch_size=2", "--eval.max_articles=1", "--rule.grad_rms_chunks=5",
        "--rule.compile=false"]
TINY_BENCH = ["--model.emb_size=16", "--model.hidden_size=24", "--bench.vocab_size=50", "--bench.batch_size=2",
              "--eval.segment_length=6", "--bench.short_segment=3", "--meta.unroll=2", "--bench.repeats=1",
              "--bench.warmup=1", "--bench.steps=1", "--bench.learner_hidden=4", "--bench.memory_unrolls=[1,4]",
              "--rule.compile=false"]
GPU_BENCH = ["--bench.memory_unrolls=[1,4,16]", "--bench.repeats=3"]


# ---- running a stage ------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> dict:
    """Run a stage's subprocess with a hard time limit; its output goes to `log`."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                                     "WANDB_MODE": "disabled", **(env or {})})
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc, timed_out = proc.wait(), True
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.perf_counter() - start, 1),
            "budget_s": round(timeout, 1), "log": log.name, "tail": tail}


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


# ---- stages ---------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, gpus=torch.cuda.device_count(), gpu=props.name,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return info


def stage_tests(device: torch.device, out: Path, budget: float) -> dict:
    junit = out / "gpu_tests.xml"
    r = _run(_python("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_gpu.py"),
                     f"--junitxml={junit}"), budget, out / "gpu_tests.log", env={"DYNLM_TEST_DEVICE": str(device)})
    counts, failed = {}, []
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        for case in suite.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                failed.append(f"{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:200]}")
    ok = r["rc"] == 0 and not r["timed_out"] and counts.get("tests", 0) > 0
    return {**r, **counts, "failed": failed, "ok": ok}


def stage_bench(device: torch.device, out: Path, budget: float, tiny: bool) -> dict:
    path = out / "bench.json"
    r = _run(_python("-m", "dynlm", "bench", "--device", str(device), "--out", str(path),
                     *(TINY_BENCH if tiny else GPU_BENCH)), budget, out / "bench.log")
    result = {**r, "ok": r["rc"] == 0 and path.is_file()}
    if path.is_file():
        bench = read_json(path)
        result["bandwidth_gb_s"] = bench["settings"]["bandwidth_gb_s"]
        result["table"] = bench["table"]
        result["rows"] = {k: {f: v[f] for f in ("tokens_per_s", "of_bound", "vs_static_eval")}
                          for k, v in bench["throughput"].items()}
    return result


def stage_pipeline(device: torch.device, out: Path, work: Path, budget: float, tiny: bool,
                   data_dir: Path | None) -> dict:
    """Runs `pipeline_child` in a subprocess (killed at the budget); it writes pipeline.json stage by stage
    and its runs (checkpoints) under `work`."""
    path = out / "pipeline.json"
    cmd = _python("-m", "dynlm.gpu_check", "--pipeline-child", "--device", str(device), "--out", str(out),
                  "--work", str(work), "--budget-s", str(budget), *(["--tiny"] if tiny else []),
                  *(["--data-dir", str(data_dir)] if data_dir else []))
    r = _run(cmd, budget + 30, out / "pipeline.log")  # the child keeps within `budget`; +30 s to write up
    stages = read_json(path) if path.is_file() else {}
    ok = r["rc"] == 0 and all(stages.get(k, {}).get("ok") for k in ("train", "metatrain", "evaluate"))
    return {**r, "stages": stages, "ok": ok}


def stage_multi_gpu(out: Path, work: Path, budget: float) -> dict:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return {"ok": None, "skip_reason": f"{n} GPU(s) visible: the 2-process NCCL check needs 2"}
    runs = {}
    for procs in (1, 2):
        run_dir = work / f"ddp{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "-m", "dynlm", "train",
               "--out", str(run_dir), *TINY[:6], "--model.emb_size=64", "--model.hidden_size=128",
               "--train.batch_size=8", "--train.bptt=20", "--train.max_steps=20", "--train.log_every=20",
               "--train.eval_every=1000", "--run.device=cuda", "--log.wandb_mode=disabled"]
        runs[procs] = _run(cmd, budget / 2, out / f"ddp{procs}.log")
    losses = {p: (_metric_values(work / f"ddp{p}" / "metrics.jsonl", "train/loss") or [None])[-1] for p in runs}
    ok = all(r["rc"] == 0 for r in runs.values()) and None not in losses.values() and \
        abs(losses[1] - losses[2]) <= 1e-3 * abs(losses[1])
    return {"ok": ok, "loss_1_process": losses[1], "loss_2_processes": losses[2], "runs": runs}


def _metric_values(path: Path, key: str) -> list[float]:
    if not path.is_file():
        return []
    return [row[key] for row in map(json.loads, read_text(path).splitlines()) if row.get(key) is not None]


# ---- the pipeline, inside its own process ------------------------------------------------------
def pipeline_child(device: torch.device, out: Path, work: Path, budget: float, tiny: bool, data_dir: Path | None) -> int:
    from .cli import main as dynlm
    from .config import load_config
    from .cost import meta_training_cost, static_training_cost

    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if tiny:
        base = TINY + [f"--data.cache_dir={work / 'cache'}"]
    else:
        data = data_dir or REPO.parent / "shared" / "data" / "wikitext-2"
        base = PAPER + ["--data.source=wikitext", f"--data.path={data}", f"--data.cache_dir={work / 'cache'}"]
    base += [f"--run.device={device}", "--log.wandb_mode=disabled"]
    report, path = {}, out / "pipeline.json"

    def minutes(share: float) -> str:
        return f"{max(0.05, budget * share / 60):.3f}"

    def stage(name: str, argv: list[str], metrics: Path | None, key: str | None, predicted: dict | None):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            rc = dynlm(argv)
            error = None
        except SystemExit as e:
            rc, error = e.code, f"exit {e.code}"
        except Exception as e:  # report and go on: the next stages still say something
            rc, error = 1, f"{type(e).__name__}: {e}"
        row = {"ok": rc in (0, None) and error is None, "error": error, "seconds": round(time.perf_counter() - t0, 1)}
        if metrics is not None and key:
            rates = _metric_values(metrics, key)
            row["tokens_per_s"] = sorted(rates)[len(rates) // 2] if rates else None  # median of the logged windows
        if device.type == "cuda":
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if predicted:
            row["predicted"] = predicted
        report[name] = row
        write_json(path, report)
        print(f"[gpu-check pipeline] {name}: {row}", flush=True)

    cfg = load_config([], base)
    vocab = None
    train_dir, meta_dir, eval_dir = work / "static", work / "meta", work / "eval"
    stage("train", ["train", "--out", str(train_dir), "--overwrite", *base,
                    f"--train.max_minutes={minutes(PIPELINE_SHARES['train'])}"],
          train_dir / "metrics.jsonl", "train/tokens_per_s", None)
    ck = train_dir / "checkpoints" / "best.pt"
    if ck.is_file():
        vocab = torch.load(ck, map_location="cpu", weights_only=False)["params"]["embed"].shape[0]
        report["train"]["predicted"] = _predict(static_training_cost(cfg, vocab))
    stage("metatrain", ["metatrain", "--init", str(ck), "--out", str(meta_dir), "--overwrite", *base,
                        f"--meta.max_minutes={minutes(PIPELINE_SHARES['metatrain'])}"],
          meta_dir / "metrics.jsonl", "meta/tokens_per_s", _predict(meta_training_cost(cfg, vocab)) if vocab else None)
    stage("evaluate", ["evaluate", "--checkpoint", str(meta_dir / "checkpoints" / "best.pt"), "--out", str(eval_dir),
                       "--modes", MODES, *base], None, None, None)
    summary = eval_dir / "summary.json"
    if summary.is_file():
        modes = read_json(summary)["modes"]
        report["evaluate"]["modes"] = {m: {"ppl": round(number(v["ppl"]), 2), "tokens_per_s": v["tokens_per_s"]}
                                       for m, v in modes.items()}
        report["evaluate"]["ok"] = report["evaluate"]["ok"] and set(MODES.split(",")) <= set(modes)
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_json(path, report)
    return 0


def _predict(cost: dict, tflops: float = 100.0, bandwidth_tb_s: float = 3.0) -> dict:
    """cost.py's expectation at `dynlm experiment --estimate`'s default throughput assumptions."""
    from .cost import expected_rates
    return {"tokens_per_s": round(min(expected_rates(cost, tflops, bandwidth_tb_s))), "memory_gib": round(cost["memory_bytes"] / 2**30, 2),
            "assumed": f"{tflops:g} TFLOP/s, {bandwidth_tb_s:g} TB/s"}


# ---- the report -----------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# dynlm gpu-check: {'PASSED' if result['ok'] else 'FAILED'}", "",
             f"{result['date']}, {env.get('gpu', 'CPU')} ({env['device']}), torch {env['torch']}"
             + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + f"; budget {result['minutes']:g} min, "
             f"took {result['seconds'] / 60:.1f} min. Command: `{result['command']}`", "",
             "| stage | result | seconds (budget) |", "|---|---|---:|"]
    for name, s in result["stages"].items():
        status = {True: "ok", False: "FAILED", None: "skipped"}[s.get("ok")]
        if s.get("timed_out"):
            status = "TIMED OUT"
        if name == "tests" and "tests" in s:
            status += f" ({s['tests'] - s['failures'] - s['errors'] - s['skipped']} passed, {s['failures']} failed, " \
                      f"{s['errors']} errors, {s['skipped']} skipped)"
        if s.get("skip_reason"):
            status += f": {s['skip_reason']}"
        lines.append(f"| {name} | {status} | {s.get('seconds', '')} ({s.get('budget_s', '')}) |")
    failed = result["stages"].get("tests", {}).get("failed")
    if failed:
        lines += ["", "Failed tests:", *[f"- {f}" for f in failed]]
    pipe = result["stages"].get("pipeline", {}).get("stages", {})
    if pipe:
        scale = "tiny model, synthetic corpus" if result["tiny"] else "WikiText-2, the paper's 3 x 1150 LSTM"
        lines += ["", f"Pipeline ({scale}); predicted: cost.py at 100 TFLOP/s and 3 TB/s:", "",
                  "| stage | ok | seconds | tokens/s | predicted tokens/s | peak memory (GiB) | predicted (GiB) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for name in ("train", "metatrain", "evaluate"):
            s = pipe.get(name)
            if not s:
                continue
            p = s.get("predicted") or {}
            fmt = lambda v, f="{:,.0f}": f.format(v) if v is not None else ""  # noqa: E731
            lines.append(f"| {name} | {'ok' if s['ok'] else 'FAILED: ' + str(s.get('error'))} | {s['seconds']} | "
                         f"{fmt(s.get('tokens_per_s'))} | {fmt(p.get('tokens_per_s'))} | "
                         f"{fmt(s.get('peak_memory_gib'), '{:.2f}')} | {fmt(p.get('memory_gib'), '{:.2f}')} |")
        modes = pipe.get("evaluate", {}).get("modes")
        if modes:
            lines += ["", "| mode | ppl (untuned, a few articles: a smoke test, not a result) | tokens/s |",
                      "|---|---:|---:|"]
            lines += [f"| {m} | {number(v['ppl']):.2f} | {v['tokens_per_s'] or 0:,.0f} |" for m, v in modes.items()]
    bench = result["stages"].get("bench", {})
    if bench.get("table"):
        lines += ["", "## dynlm bench", "", bench["table"]]
    for name, s in result["stages"].items():
        if s.get("ok") is False and s.get("tail"):
            lines += ["", f"## {name}: last lines of {s.get('log')}", "", "```", *s["tail"], "```"]
    return "\n".join(lines) + "\n"


def run_gpu_check(device: str, out: Path, minutes: float, tiny: bool, data_dir: Path | None,
                  only: list[str] | None = None, work: Path | None = None) -> dict:
    """work: where the pipeline's and torchrun's runs go (default OUT/work): checkpoints, large."""
    from .device import resolve_device
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work) if work else out / "work"
    budget = minutes * 60
    start = time.perf_counter()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "minutes": minutes, "tiny": tiny,
              "command": "dynlm gpu-check " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["gpu-check"] else "",
              "environment": environment(dev), "stages": {}}
    print(f"dynlm gpu-check on {dev}: {json.dumps(result['environment'])}", flush=True)
    runners = {"tests": lambda b: stage_tests(dev, out, b),
               "pipeline": lambda b: stage_pipeline(dev, out, work, b, tiny, data_dir),
               "bench": lambda b: stage_bench(dev, out, b, tiny),
               "multi_gpu": lambda b: stage_multi_gpu(out, work, b)}
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    todo = [n for n in runners if (not only or n in only) and (n != "multi_gpu" or gpus >= 2)]
    for i, name in enumerate(todo):
        left = budget * (1 - SLACK) - (time.perf_counter() - start)
        stage_budget = left * SHARES[name] / sum(SHARES[n] for n in todo[i:])
        print(f"[gpu-check] {name} (budget {stage_budget:.0f} s)", flush=True)
        result["stages"][name] = s = runners[name](stage_budget)
        print(f"[gpu-check] {name}: {'ok' if s.get('ok') else 'FAILED'} ({s.get('seconds', 0)} s)", flush=True)
        write_json(out / "gpu_check.json", {**result, "ok": None})  # partial
    if "multi_gpu" not in todo and (not only or "multi_gpu" in only):
        result["stages"]["multi_gpu"] = stage_multi_gpu(out, work, 0)  # fewer than 2 GPUs: says why it is skipped
    result["seconds"] = time.perf_counter() - start
    result["ok"] = all(s.get("ok") is not False for s in result["stages"].values())
    write_json(out / "gpu_check.json", result)
    (out / "gpu_check.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":  # the pipeline's own process (stage_pipeline)
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--pipeline-child", action="store_true", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--data-dir")
    a = p.parse_args()
    sys.exit(pipeline_child(torch.device(a.device), Path(a.out), Path(a.work), a.budget_s, a.tiny,
                            Path(a.data_dir) if a.data_dir else None))
