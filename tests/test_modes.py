"""Modes (RULE[@WEIGHTS][+cache]) and evaluation protocols (article, krause)."""
import json
import math

import pytest

from conftest import TINY
from dynlm.cli import main
from dynlm.config import ConfigError, load_config
from dynlm.modes import Mode, parse_mode, parse_modes, protocol_of, protocol_preset, tuned_keys


def test_mode_names_round_trip_and_say_what_they_run():
    assert parse_mode("dyneval@lstm+cache") == Mode("dyneval", "lstm", True)
    assert parse_mode("cache") == Mode("static", None, True) and parse_mode("cache").name == "cache"
    for name in ("static", "sgd", "dyneval", "dyneval@lstm", "adam@all", "learned+cache", "sgd@all+cache"):
        assert parse_mode(name).name == name
    assert tuned_keys(parse_mode("dyneval+cache")) == ("dyneval_lr", "dyneval_lamb", "cache_theta", "cache_lambda")
    assert tuned_keys(parse_mode("learned")) == ()


@pytest.mark.parametrize("bad, words", [("bogus", "unknown mode"), ("dyneval@emb", "adapted weights"),
                                        ("dyneval+dyneval", "can be added"), ("cache+cache", "already"),
                                        ("static@all", "adapts no weights")])
def test_bad_mode_names_are_clear_errors(bad, words):
    with pytest.raises(ConfigError, match=words):
        parse_mode(bad)
    with pytest.raises(ConfigError, match="given twice"):
        parse_modes("sgd,sgd")


def test_protocol_presets_set_what_they_name():
    krause = load_config([protocol_preset("krause")])
    assert (krause.eval.segment_length, krause.eval.batch_size, krause.eval.boundary) == (5, 1, "continuous")
    assert protocol_of(krause.eval) == "krause"
    assert protocol_of(load_config([protocol_preset("article")]).eval) == "article"
    assert protocol_of(load_config([]).eval) == "article"  # the defaults read every method alike, by article
    assert protocol_of(load_config([], ["eval.segment_length=35"]).eval).startswith("custom (8 streams, segment 35")
    with pytest.raises(ConfigError, match="unknown protocol"):
        protocol_preset("nope")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modes")
    run = tmp / "run"
    assert main(["train", "--out", str(run), *[f"--{o}" for o in TINY + [f"data.cache_dir={tmp / 'cache'}"]]]) == 0
    return run, tmp / "cache"


def evaluate(run, cache, out, modes, *extra):
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--split", "valid",
                 "--modes", modes, "--out", str(out), f"--data.cache_dir={cache}", "--rule.grad_rms_chunks=3",
                 *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_the_cache_on_top_of_a_mode_composes_the_two(trained, tmp_path):
    """`sgd+cache` is sgd when the cache gets no weight and the cache alone when sgd does not move; in
    between it differs from both (the cache reads the adapted model's hidden states)."""
    run, cache = trained
    s = evaluate(run, cache, tmp_path / "a", "static,sgd,cache,sgd+cache", "--rule.sgd_lr=0.05",
                 "--rule.cache_lambda=0.1")["modes"]
    assert s["sgd+cache"]["ppl"] not in (pytest.approx(s["sgd"]["ppl"]), pytest.approx(s["cache"]["ppl"]))
    off = evaluate(run, cache, tmp_path / "b", "sgd,sgd+cache", "--rule.sgd_lr=0.05", "--rule.cache_lambda=0")["modes"]
    assert off["sgd+cache"]["ppl"] == pytest.approx(off["sgd"]["ppl"], rel=1e-12)
    still = evaluate(run, cache, tmp_path / "c", "cache,sgd+cache", "--rule.sgd_lr=0", "--rule.cache_lambda=0.1")
    assert still["modes"]["sgd+cache"]["ppl"] == pytest.approx(still["modes"]["cache"]["ppl"], rel=1e-6)  # float32: per-stream vs shared kernels


def test_evaluate_under_the_krause_protocol_says_so(trained, tmp_path, capsys):
    run, cache = trained
    s = evaluate(run, cache, tmp_path / "k", "static,adam,dyneval@lstm", "--protocol", "krause",
                 "--rule.adam_lr=1e-3", "--rule.dyneval_lr=1e-4")
    assert s["protocol"] == "krause" and s["settings"]["adam"]["adam_lr"] == {"value": 1e-3, "source": "config"}
    # what made the numbers is recorded beside them
    assert s["checkpoint"].endswith("best.pt") and s["split"] == "valid" and s["eval"]["segment_length"] == 5
    assert (tmp_path / "k" / "config.yaml").is_file() and s["finished"].endswith("UTC")
    out = capsys.readouterr()
    assert "protocol: krause" in out.out and "not tuned" in out.err  # untuned baselines are said to be
    assert all(math.isfinite(m["ppl"]) for m in s["modes"].values())
    assert s["modes"]["adam"]["ppl"] < s["modes"]["static"]["ppl"]


def test_an_interrupted_evaluation_resumes_with_the_modes_it_had_scored(trained, tmp_path, monkeypatch, capsys):
    """Each mode's scores are kept as it finishes (OUT/.modes); a rerun after a crash scores only the
    rest, gives the numbers an uninterrupted run gives, and leaves nothing behind."""
    import dynlm.evaluate as evaluation
    run, cache = trained
    whole = evaluate(run, cache, tmp_path / "whole", "static,sgd,adam", "--rule.sgd_lr=0.05")["modes"]
    real, calls = evaluation.score_mode, []

    def crash_on_adam(mode, *a, **kw):
        calls.append(mode.name)
        if mode.name == "adam":
            raise RuntimeError("simulated crash")
        return real(mode, *a, **kw)
    monkeypatch.setattr(evaluation, "score_mode", crash_on_adam)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError):
        main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--split", "valid", "--modes",
              "static,sgd,adam", "--out", str(out), f"--data.cache_dir={cache}", "--rule.grad_rms_chunks=3",
              "--rule.sgd_lr=0.05"])
    assert calls == ["static", "sgd", "adam"] and len(list((out / ".modes").glob("*.npz"))) == 2
    monkeypatch.setattr(evaluation, "score_mode", real)
    capsys.readouterr()
    resumed = evaluate(run, cache, out, "static,sgd,adam", "--rule.sgd_lr=0.05")["modes"]
    assert "sgd: scores of an earlier, interrupted run of this evaluation reused" in capsys.readouterr().out
    assert {m: v["ppl"] for m, v in resumed.items()} == {m: v["ppl"] for m, v in whole.items()}
    assert not (out / ".modes").exists()
    # other settings are another evaluation: nothing is reused (and replacing the finished one is asked for)
    again = evaluate(run, cache, out, "static,sgd", "--rule.sgd_lr=0.1", "--overwrite")["modes"]
    assert "reused" not in capsys.readouterr().out and again["sgd"]["ppl"] != whole["sgd"]["ppl"]
