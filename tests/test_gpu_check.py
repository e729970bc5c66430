"""`dynlm gpu-check`'s CPU smoke: the prepared GPU check runs every stage on the CPU at tiny sizes, so
that the paths it takes on a lent GPU stay importable and correct between GPU runs."""
import json

import pytest

from dynlm.cli import main


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_stage_and_reports(tmp_path, capsys):
    # A generous budget: each stage is killed at its share of it, and the tiny stages take ~30 s in all
    # here; a slow or loaded CI machine must not turn that kill into a failure.
    minutes = 20
    out = tmp_path / "gc"
    assert main(["gpu-check", "--device", "cpu", "--tiny", "--minutes", str(minutes), "--out", str(out)]) == 0
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["ok"] is True and result["seconds"] < minutes * 60  # the budget holds by construction
    stages = result["stages"]
    assert stages["tests"]["ok"] and stages["tests"]["tests"] >= 10 and stages["tests"]["failures"] == 0
    assert stages["bench"]["ok"] and stages["bench"]["bandwidth_gb_s"] > 0
    assert stages["bench"]["rows"]["dyneval_seg6"]["of_bound"] > 0
    pipe = stages["pipeline"]["stages"]
    assert all(pipe[k]["ok"] for k in ("train", "metatrain", "evaluate"))
    assert pipe["train"]["tokens_per_s"] > 0 and pipe["train"]["predicted"]["tokens_per_s"] > 0
    assert set(pipe["evaluate"]["modes"]) >= {"static", "dyneval", "dyneval@lstm", "cache", "learned", "learned+cache"}
    assert stages["multi_gpu"]["ok"] is None and "GPU(s) visible" in stages["multi_gpu"]["skip_reason"]
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# dynlm gpu-check: PASSED") and "| tests | ok" in md and "## dynlm bench" in md


@pytest.mark.parametrize("argv,message", [
    (["--minutes", "0"], "--minutes must be in [1, 60]"),
    (["--only", "tests,nonsense"], "unknown stage(s)"),
    (["--data-dir", "/nonexistent"], "no train.txt there"),
])
def test_gpu_check_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["gpu-check", "--device", "cpu", "--out", str(tmp_path / "gc"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "gc").exists()
