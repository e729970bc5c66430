"""`dynlm tune`: grid search with edge extension, RUN/tuned_PROTOCOL.yaml (values per mode), and `evaluate`
picking them up."""
import json
import math
import re
import shutil

import pytest
import torch
import yaml

from conftest import TINY
from dynlm.checkpoint import save_checkpoint
from dynlm.cli import main
from dynlm.config import ConfigError, load_config
from dynlm.experiments.runner import ExperimentRunner
from dynlm.modes import parse_mode
from dynlm.tune import check_mode_grids, extend, grid_search, initial_grid, mode_grids

# small grids (given at segment length 5; TINY evaluates at 10, so per-update rates double)
SMALL_GRIDS = ["tune.sgd_lr=[0.005,0.01]", "tune.dyneval_lr=[5e-5,1e-4]", "tune.dyneval_lamb=[2e-3]",
               "tune.cache_theta=[0.3]", "tune.cache_lambda=[0.01,0.02]", "tune.max_extensions=1",
               "rule.grad_rms_chunks=3"]
TUNED = "tuned_seg10-3streams-reset.yaml"  # TINY reads valid at segment length 10 with 3 streams
TUNE_DIR = "tune_seg10-3streams-reset"


def log10_bowl(center: dict):
    calls = []

    def f(point):
        calls.append(point)
        return sum((math.log10(v) - math.log10(center[a])) ** 2 for a, v in point.items())
    return f, calls


def test_grid_search_extends_towards_an_optimum_beyond_the_edge():
    f, calls = log10_bowl({"lr": 1e-3})
    best, values, grids = grid_search({"lr": [1e-5, 2e-5, 4e-5]}, f, max_extensions=10)
    # doubling steps: 8e-5, ..., 1.28e-3 is the closest to 1e-3, and 2.56e-3 shows it is interior
    assert best == {"lr": pytest.approx(1.28e-3)} and grids["lr"][-1] == pytest.approx(2.56e-3)
    assert len(calls) == len(values) == len(grids["lr"]) == 3 + 6  # nothing evaluated twice
    # downwards too, and only as many steps as allowed
    f, _ = log10_bowl({"lr": 1e-9})
    best, _, grids = grid_search({"lr": [1e-5, 2e-5, 4e-5]}, f, max_extensions=2)
    assert grids["lr"] == pytest.approx([2.5e-6, 5e-6, 1e-5, 2e-5, 4e-5]) and best == {"lr": pytest.approx(2.5e-6)}


def test_grid_search_keeps_an_interior_optimum_and_extends_2d_rows():
    f, calls = log10_bowl({"lr": 2e-5, "lamb": 1e-2})
    best, values, grids = grid_search({"lr": [1e-5, 2e-5, 4e-5], "lamb": [1e-3, 2e-3]}, f, max_extensions=1)
    assert grids["lr"] == [1e-5, 2e-5, 4e-5]  # interior: left alone
    assert grids["lamb"] == [1e-3, 2e-3, 4e-3]  # on the edge: one step, evaluated against every lr
    assert len(values) == 9 and best == {"lr": 2e-5, "lamb": 4e-3}


def test_extension_stops_at_bounds_and_single_values():
    assert extend([0.3, 0.6], 0.6, "cache_lambda") is None  # 1.2 would leave [0, 1)
    assert extend([0.2, 0.4], 0.4, "cache_lambda") == 0.8
    assert extend([0.5], 0.5, "cache_theta") is None  # a one-value grid is a fixed value
    assert extend([1.0, 2.0, 4.0], 2.0, "sgd_lr") is None
    assert extend([0.0, 3e-5, 6e-5], 0.0, "dyneval_lamb") is None  # 0 (no decay) is the axis' own bound


def test_a_decay_grid_may_start_at_zero_a_rate_grid_may_not():
    cfg = load_config([], ["eval.segment_length=5", "tune.dyneval_lamb=[0,1e-4]"])
    assert initial_grid(cfg, "dyneval_lamb") == [0.0, 1e-4]
    with pytest.raises(ConfigError, match="tune.dyneval_lr"):
        load_config([], ["tune.dyneval_lr=[0,1e-4]"])


def test_zero_decay_is_a_bound_not_an_edge():
    """A grid that reaches lamb = 0 and finds it best is done: nothing lies below to extend to."""
    f = lambda point: point["lamb"]  # noqa: E731 (best at the smallest lamb)
    best, values, grids = grid_search({"lamb": [0.0, 1e-4, 2e-4]}, f, max_extensions=3)
    assert best == {"lamb": 0.0} and grids["lamb"] == [0.0, 1e-4, 2e-4] and len(values) == 3


def test_per_update_rates_scale_with_the_segment_length():
    cfg = load_config([], ["eval.segment_length=35"])
    assert initial_grid(cfg, "dyneval_lr") == pytest.approx([7 * v for v in cfg.tune.dyneval_lr])
    assert initial_grid(cfg, "dyneval_lamb") == pytest.approx([7 * v for v in cfg.tune.dyneval_lamb])
    assert initial_grid(cfg, "cache_theta") == cfg.tune.cache_theta  # not a per-update rate


def test_a_mode_can_search_its_own_grid(tmp_path):
    """dyneval@lstm's rates lie far from all-weights dyneval's: tune.grids.MODE replaces the shared grid
    for that mode alone (scaled like it), and a runner's tuning record of every other mode stays valid."""
    own = 'tune.grids={"dyneval@lstm": {"dyneval_lr": [1e-4, 2e-4], "dyneval_lamb": [0, 1e-3]}}'
    cfg = load_config([], ["eval.segment_length=10", "tune.dyneval_lr=[1e-5,2e-5]", own])
    assert mode_grids(parse_mode("dyneval@lstm"), cfg) == {"dyneval_lr": [2e-4, 4e-4], "dyneval_lamb": [0.0, 2e-3]}
    assert mode_grids(parse_mode("dyneval"), cfg)["dyneval_lr"] == [2e-5, 4e-5]
    plain = load_config([], ["eval.segment_length=10", "tune.dyneval_lr=[1e-5,2e-5]"])
    runner = ExperimentRunner.__new__(ExperimentRunner)  # tune_key reads only its arguments
    ckpt = tmp_path / "best.pt"
    save_checkpoint({"params": {"w": torch.zeros(2)}}, ckpt)
    assert runner.tune_key(ckpt, cfg, "dyneval") == runner.tune_key(ckpt, plain, "dyneval")
    assert runner.tune_key(ckpt, cfg, "dyneval@lstm") != runner.tune_key(ckpt, plain, "dyneval@lstm")


@pytest.mark.parametrize("grids, message", [
    ('{"dyneval@lstm": {"dyneval_lr": [-1e-4]}}', "tune.grids.dyneval@lstm.dyneval_lr: must be > 0"),
    ('{"dyneval@lstm": {"lr": [1e-4]}}', "tune.grids.dyneval@lstm.lr: not a grid"),
    ('{"dyneval@lstm": {"sgd_lr": [1e-4]}}', "tune.grids.dyneval@lstm: sgd_lr is not searched for dyneval@lstm"),
    ('{"dyneval@lsmt": {"dyneval_lr": [1e-4]}}', "tune.grids.dyneval@lsmt: "),
    ('{"static+cache": {"cache_lambda": [0.5]}}', "tune.grids.static+cache: write the mode as 'cache'"),
    ('{"dyneval@lstm": {"dyneval_lr": ["1e-4"]}}', "tune.grids.dyneval@lstm.dyneval_lr"),
])
def test_a_grid_no_mode_would_search_is_a_one_line_error(grids, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_mode_grids(load_config([], [f"tune.grids={grids}"]))


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """A tiny trained run, tuned on all 3 validation articles with small grids."""
    tmp = tmp_path_factory.mktemp("tune")
    overrides = [f"--{o}" for o in TINY + [f"data.cache_dir={tmp / 'cache'}"]]
    run = tmp / "run"
    assert main(["train", "--out", str(run), *overrides]) == 0
    ckpt = run / "checkpoints" / "best.pt"
    assert main(["tune", "--checkpoint", str(ckpt), "--articles", "3", *[f"--{o}" for o in SMALL_GRIDS]]) == 0
    return run, ckpt, tmp / "cache"


def evaluate(ckpt, out, cache, *extra):
    assert main(["evaluate", "--checkpoint", str(ckpt), "--split", "valid", "--modes", "static,sgd,dyneval,cache",
                 "--out", str(out), f"--data.cache_dir={cache}", "--rule.grad_rms_chunks=3", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_tune_writes_the_best_grid_values(tuned_run):
    run, _, _ = tuned_run
    tuned = yaml.safe_load((run / TUNED).read_text())["modes"]
    info = json.loads((run / TUNE_DIR / "tune.json").read_text())
    assert info["protocol"].startswith("custom") and info["n_articles"] == 3
    for mode, axes in {"sgd": ["sgd_lr"], "dyneval": ["dyneval_lr", "dyneval_lamb"],
                       "cache": ["cache_theta", "cache_lambda"]}.items():
        rows = [r for r in info["grid"] if r["mode"] == mode]
        best = min(rows, key=lambda r: r["ppl"])
        assert best["best"] and sum(r["best"] for r in rows) == 1
        assert best["values"] == ", ".join(f"{a}={tuned[mode][a]:g}" for a in axes)
        assert set(tuned[mode]) == set(axes)  # each mode keeps its own values only
    assert tuned["sgd"]["sgd_lr"] in (0.01, 0.02, 0.04)  # the grid at segment length 10, or its one extension
    # the cache helps a lot on these articles: lambda sits on the top edge, so the grid grew to 0.04
    assert info["extended"]["cache"]["cache_lambda"] == [0.04] and tuned["cache"]["cache_lambda"] == 0.04
    assert info["extended"]["cache"]["cache_theta"] == []  # a single value is never extended
    assert info["on_edge"]["cache"] == ["cache_lambda"]  # still on its edge after the one extension allowed
    logged = [json.loads(l) for l in (run / TUNE_DIR / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["tune/best_ppl/cache"] == pytest.approx(min(r["ppl"] for r in info["grid"] if r["mode"] == "cache"))


def test_evaluate_uses_tuned_values_and_explicit_overrides_win(tuned_run, tmp_path, capsys):
    run, ckpt, cache = tuned_run
    tuned = yaml.safe_load((run / TUNED).read_text())["modes"]
    info = json.loads((run / TUNE_DIR / "tune.json").read_text())
    summary = evaluate(ckpt, tmp_path / "auto", cache)
    out = capsys.readouterr()
    assert "using tuned values" in out.out
    # tuned on the articles this evaluation scores: said, not hidden
    assert "tuned on text this evaluation scores: cache (the first 3 articles of the validation split)" in out.err
    assert summary["tuned"]["overlap"].count("the first 3 articles") == 3  # sgd, dyneval, cache
    assert summary["tuned"]["modes"] == tuned
    assert all(v["source"] == "tuned" for m in ("sgd", "dyneval", "cache") for v in summary["settings"][m].values())
    modes = summary["modes"]
    for mode in ("sgd", "dyneval", "cache"):  # the same 3 articles as the tuning slice: the same numbers
        best = min(r["ppl"] for r in info["grid"] if r["mode"] == mode)
        assert modes[mode]["ppl"] == pytest.approx(best, rel=1e-6)
    assert modes["cache"]["ppl"] <= modes["static"]["ppl"]  # the tuned cache is not worse than static
    # the same values passed explicitly, without the file, give the same numbers
    explicit = evaluate(ckpt, tmp_path / "explicit", cache, "--ignore-tuned",
                        *[f"--rule.{k}={v}" for values in tuned.values() for k, v in values.items()])
    assert "tuned" not in explicit
    for mode in modes:
        assert explicit["modes"][mode]["ppl"] == pytest.approx(modes[mode]["ppl"], rel=1e-9)
    # a command-line value beats the file: lambda = 0 is the static model again
    off = evaluate(ckpt, tmp_path / "off", cache, "--rule.cache_lambda=0")
    assert off["modes"]["cache"]["ppl"] == off["modes"]["static"]["ppl"]
    assert off["tuned"]["explicit"] == ["cache_lambda"] and off["settings"]["cache"]["cache_lambda"] == {
        "value": 0.0, "source": "explicit"}


def test_tune_bad_input_is_a_clear_error(tuned_run, tmp_path, capsys):
    _, ckpt, cache = tuned_run
    assert main(["tune", "--checkpoint", str(ckpt), "--modes", "cache,bogus", f"--data.cache_dir={cache}"]) == 2
    assert "unknown mode" in capsys.readouterr().err
    assert main(["tune", "--checkpoint", str(ckpt), "--modes", "static", f"--data.cache_dir={cache}"]) == 2
    assert "nothing to tune for static" in capsys.readouterr().err
    assert main(["tune", "--checkpoint", str(ckpt), "--modes", "learned+cache", f"--data.cache_dir={cache}"]) == 2
    assert "needs a learner" in capsys.readouterr().err
    assert main(["tune", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["tune", "--checkpoint", str(ckpt), "--modes", "cache", "--tune.cache_lambda=[]"]) == 2
    assert "tune.cache_lambda" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(ckpt), "--modes", "cache", "--rule.cache_lambda=1.5"]) == 2
    assert "cache_lambda" in capsys.readouterr().err


def test_malformed_tuned_file_is_a_clear_error(tuned_run, tmp_path, capsys):
    run, ckpt, cache = tuned_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / TUNED).write_text("modes:\n  cache:\n    no_such_key: 1\n")
    assert main(["evaluate", "--checkpoint", str(copy / "checkpoints" / "best.pt"), "--out", str(tmp_path / "e"),
                 f"--data.cache_dir={cache}"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_tune_can_skip_the_articles_an_evaluation_scores(tuned_run, tmp_path, capsys):
    """--skip-articles 1 --articles 2 tunes on articles 2-3 exactly: with article 1 alone they make up
    the 3 articles of the fixture's tuning, token for token."""
    run, _, cache = tuned_run
    whole = json.loads((run / TUNE_DIR / "tune.json").read_text())
    parts = []
    for skip, n in ((0, 1), (1, 2)):
        copy = tmp_path / f"run{skip}"
        shutil.copytree(run, copy)
        assert main(["tune", "--checkpoint", str(copy / "checkpoints" / "best.pt"), "--modes", "cache",
                     "--skip-articles", str(skip), "--articles", str(n), f"--data.cache_dir={cache}",
                     *[f"--{o}" for o in SMALL_GRIDS]]) == 0
        parts.append(json.loads((copy / TUNE_DIR / "tune.json").read_text()))
        assert (parts[-1]["skip_articles"], parts[-1]["n_articles"]) == (skip, n)
    assert "on valid articles 2-3" in capsys.readouterr().out
    assert "articles 2-3" in (tmp_path / "run1" / TUNED).read_text()
    assert sum(p["n_tokens"] for p in parts) == whole["n_tokens"]
    nll = sum(p["n_tokens"] * math.log(p["static_ppl"]) for p in parts)
    assert math.exp(nll / whole["n_tokens"]) == pytest.approx(whole["static_ppl"], rel=1e-9)
    # nothing left to tune on: a clear error, not an empty grid
    assert main(["tune", "--checkpoint", str(tmp_path / "run0" / "checkpoints" / "best.pt"), "--modes", "cache",
                 "--skip-articles", "3", f"--data.cache_dir={cache}"]) == 2
    assert "none would be left" in capsys.readouterr().err


def test_a_grid_on_which_every_point_diverges_is_an_error_and_writes_nothing(tuned_run, tmp_path, capsys):
    run, _, cache = tuned_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / TUNED).read_text()
    assert main(["tune", "--checkpoint", str(copy / "checkpoints" / "best.pt"), "--modes", "sgd@all", "--articles", "1",
                 f"--data.cache_dir={cache}", "--tune.sgd_lr=[1e6,1e7]", "--tune.max_extensions=0"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("dynlm tune:")]  # not progress bars
    assert len(err) == 1 and "error: tune sgd@all: every point of the grid diverged" in err[0]
    assert (copy / TUNED).read_text() == before  # no "best" of a diverged grid was written


def test_the_cache_on_top_of_a_mode_starts_from_both_tuned_values(tuned_run, tmp_path):
    """dyneval+cache keeps dyneval's tuned rates and the cache's tuned theta, and searches the
    interpolation weight (tune.combo_axes) on the adapted model's hidden states."""
    run, _, cache = tuned_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["tune", "--checkpoint", str(copy / "checkpoints" / "best.pt"), "--modes", "dyneval+cache",
                 "--articles", "3", f"--data.cache_dir={cache}", *[f"--{o}" for o in SMALL_GRIDS]]) == 0
    tuned = yaml.safe_load((copy / TUNED).read_text())["modes"]
    combo = tuned["dyneval+cache"]
    assert {k: combo[k] for k in ("dyneval_lr", "dyneval_lamb")} == tuned["dyneval"]
    assert combo["cache_theta"] == tuned["cache"]["cache_theta"] and combo["cache_lambda"] in (0.01, 0.02, 0.04)
    info = json.loads((copy / TUNE_DIR / "tune.json").read_text())
    rows = [r for r in info["grid"] if r["mode"] == "dyneval+cache"]
    assert all(r["values"].startswith("cache_lambda=") for r in rows) and len(rows) >= 2
    assert min(r["ppl"] for r in rows) < min(r["ppl"] for r in info["grid"] if r["mode"] == "static")


def test_each_modes_tuning_text_is_remembered_and_overlap_said_per_mode(tuned_run, tmp_path, capsys):
    """Tuned one mode at a time on different text: the file keeps where each mode was tuned, and an
    evaluation of the first article warns about exactly the modes tuned on it."""
    run, _, cache = tuned_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "checkpoints" / "best.pt"
    assert main(["tune", "--checkpoint", str(ckpt), "--modes", "cache", "--skip-articles", "1", "--articles", "2",
                 f"--data.cache_dir={cache}", *[f"--{o}" for o in SMALL_GRIDS]]) == 0
    prov = yaml.safe_load((copy / TUNED).read_text())["provenance"]
    assert (prov["cache"]["skip_articles"], prov["cache"]["n_articles"]) == (1, 2)
    assert (prov["sgd"]["skip_articles"], prov["sgd"]["n_articles"]) == (0, 3)  # kept from the first tuning
    capsys.readouterr()
    summary = evaluate(ckpt, tmp_path / "e", cache, "--eval.max_articles=1")
    assert "cache" not in summary["tuned"]["overlap"] and "sgd" in summary["tuned"]["overlap"]


def test_tune_json_is_strict_json_with_a_diverged_point_as_null(tmp_path):
    """Issue 16, kind 7: a grid point that diverged (ppl inf) is null in tune.json; a later tune reads it back as inf."""
    from dynlm.tune import _with_earlier_modes, _write_grid

    rows = [{"mode": "static", "values": {}, "ppl": 10.0, "best": False},
            {"mode": "sgd", "values": {"sgd_lr": 1e6}, "ppl": math.inf, "best": False},
            {"mode": "sgd", "values": {"sgd_lr": 1e-3}, "ppl": 9.0, "best": True}]
    result = {"checkpoint": "c", "split": "valid", "skip_articles": 0, "n_articles": 1, "n_tokens": 5,
              "static_ppl": 10.0, "best": {"sgd": {"sgd_lr": 1e-3}}, "fixed": {}, "extended": {}, "on_edge": {},
              "grid": rows}
    _write_grid(tmp_path, rows, result)

    def refuse(constant):
        raise ValueError(constant)

    saved = json.loads((tmp_path / "tune.json").read_text(encoding="utf-8"), parse_constant=refuse)
    assert [r["ppl"] for r in saved["grid"]] == [10.0, None, 9.0]
    later = {**result, "best": {"cache": {"cache_lambda": 0.1}}, "grid": rows[:1]}
    merged_rows, _ = _with_earlier_modes(tmp_path / "tune.json", rows[:1], later)
    assert [r["ppl"] for r in merged_rows] == [10.0, math.inf, 9.0]


def test_settings_that_contradict_the_checkpoint_are_listed_before_anything_runs(tuned_run, tmp_path, capsys):
    """Issue 16, kind 4: in every command that loads a checkpoint, the model.* keys that differ from it are
    listed in one line (not a shape error inside torch), and rule.layers may only name layers the model has."""
    run, ckpt, cache = tuned_run
    bigger = tmp_path / "bigger.yaml"  # e.g. an experiment file for another model size
    bigger.write_text("model:\n  hidden_size: 64\n  n_layers: 2\n")
    commands = [["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")],
                ["tune", "--checkpoint", str(ckpt), "--modes", "sgd"],
                ["metatrain", "--init", str(ckpt), "--out", str(tmp_path / "out")]]
    before = sorted(p.name for p in run.iterdir())
    for command in commands:
        for extra, expected in ((["--model.hidden_size", "64"], ["model.hidden_size: checkpoint 24, now 64"]),
                                (["--config", str(bigger)], ["model.hidden_size: checkpoint 24, now 64",
                                                             "model.n_layers: checkpoint 1, now 2"])):
            assert main([*command, f"--data.cache_dir={cache}", *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"dynlm {command[0]}: error: {ckpt}: settings contradict the checkpoint's model: ")
            assert "\n" not in err and all(e in err for e in expected), err
        assert main([*command, f"--data.cache_dir={cache}", "--rule.layers=[1]"]) == 2
        assert "rule.layers=[1] names layer 1, but the model has 1 layer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in run.iterdir()) == before
