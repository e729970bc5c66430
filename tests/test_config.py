import pytest

from dynlm.config import Config, ConfigError, load_config, parse_override


def test_defaults_are_typed_dataclasses():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.train.lr > 0 and cfg.data.source == "synthetic"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("train:\n  lr: 0.01\n  batch_size: 8\nmodel:\n  adaptive_cutoffs: [5, 9]\n")
    cfg = load_config([f], ["train.lr=1e-4", "--model.n_layers=3"])
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 8 and cfg.model.n_layers == 3
    assert cfg.model.adaptive_cutoffs == [5, 9]


def test_int_is_accepted_for_float():
    assert load_config(overrides=["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize("override,match", [
    ("train.lrr=1", "unknown config key"),
    ("nosection.x=1", "unknown config key"),
    ("train.batch_size=abc", "expected int"),
    ("train.bf16=3", "true/false"),
    ("model.adaptive_cutoffs=5", "expected a list"),
    ("train", "section.key=value"),
])
def test_bad_overrides_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_bad_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  typo_key: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config([f])
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "missing.yaml"])


def test_parse_override_nests():
    assert parse_override("data.synthetic.seed=3") == {"data": {"synthetic": {"seed": 3}}}


def test_experiment_files_load():
    from pathlib import Path
    for f in sorted(Path(__file__).resolve().parents[1].joinpath("experiments").glob("*.yaml")):
        load_config([f])


def test_malformed_yaml_repeated_keys_and_bad_choices_are_one_line_errors(tmp_path, capsys):
    """Issue 16's kinds: a tab in a YAML file, a key given twice, a value outside a field's choices."""
    from dynlm.cli import main
    tab = tmp_path / "tab.yaml"
    tab.write_text("train:\n\tlr: 0.01\n")
    with pytest.raises(ConfigError, match=r"tab\.yaml, line 2: not valid YAML"):
        load_config([tab])
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 0.01\n  lr: 0.02\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml, line 3: .*'lr' given twice"):
        load_config([twice])
    for bad in ("eval.boundary=Reset", "eval.boundary=contiguous", "rule.dyneval_weights=emb", "model.softmax=big"):
        with pytest.raises(ConfigError, match="is not one of"):
            load_config([], [bad])
    assert main(["train", "--config", str(tab), "--out", str(tmp_path / "run")]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("dynlm train: error:")]
    assert len(err) == 1 and "line 2" in err[0] and not (tmp_path / "run").exists()
