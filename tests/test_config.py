import re

import pytest

from dynlm.config import Config, ConfigError, load_config, meta_steps, parse_override


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
    ("run.bf16=3", "true/false"),
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


# ---------------------------------------------------------------- issue 16, kind 1: declared once, checked by pydantic
def test_each_field_declares_its_type_choices_and_range_and_every_build_checks_them():
    import dataclasses

    from dynlm.config import EvalConfig, RuleConfig, TrainConfig

    assert hasattr(Config, "__pydantic_validator__")  # pydantic checks every config class, not hand-written code
    with pytest.raises(ConfigError, match=r"^rule\.cache_lambda: must be < 1\.0, got 1\.0$"):
        RuleConfig(cache_lambda=1.0)
    with pytest.raises(ConfigError, match=r"^train\.batch_size: must be >= 1, got 0$"):
        dataclasses.replace(TrainConfig(), batch_size=0)  # a replaced value is checked too
    with pytest.raises(ConfigError, match=r"^eval\.boundary: 'contiguous' is not one of reset, continuous$"):
        EvalConfig(boundary="contiguous")
    for override, message in [
        ("train.batch_size=true", "expected int, got True"),  # strict: YAML's true is not 1
        ("train.lr=.inf", "expected a finite number"),
        ("run.device=tpu", "expected auto, cpu, cuda or cuda:N"),
        ("tune.sgd_lr=[1e-3, -1]", "tune.sgd_lr[1]: must be > 0.0, got -1"),
        ("tune.combo_axes=[sgd_lr]", "'sgd_lr' is not one of cache_theta, cache_lambda"),
        ("log.out_dir=", "must not be empty"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config([], [override])
    assert load_config([], ["train.lr=3e-5"]).train.lr == 3e-5  # 3e-5 is a number (YAML 1.1 wants 3.0e-5)


def test_errors_name_the_file_the_line_and_the_key(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("train:\n  lr: 0.01\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"e\.yaml, line 3: train\.batch_size: must be >= 1, got 0$"):
        load_config([f])
    f.write_text("train:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError, match=r"e\.yaml, line 2: unknown config key train\.lrr \(did you mean train\.lr\?\)"):
        load_config([f])
    with pytest.raises(ConfigError, match=r"^--eval\.boundary: 'Reset' is not one of reset, continuous$"):
        load_config([], ["--eval.boundary=Reset"])
    with pytest.raises(ConfigError, match=r"^the config saved in ck\.pt: model\.hidden_size: must be >= 1, got 0$"):
        load_config([], [], base={"model": {"hidden_size": 0}}, base_name="the config saved in ck.pt")
    bom = tmp_path / "bom.yaml"  # a byte-order mark (Windows editors) and UTF-8 text, whatever the locale
    bom.write_bytes(b"\xef\xbb\xbf# Caf\xc3\xa9\nlog:\n  name: Caf\xc3\xa9\n")
    assert load_config([bom]).log.name == "Café"


def test_overrides_in_both_usual_forms_and_a_list_shows_its_syntax(tmp_path, capsys):
    from dynlm.cli import join_overrides, main

    assert join_overrides(["train", "--data.source", "text", "--train.lr=1e-3", "--out", "r", "--data.path", "-x"]) == [
        "train", "--data.source=text", "--train.lr=1e-3", "--out", "r", "--data.path=-x"]
    assert join_overrides(["--train.lr", "--train.bptt=5"]) == ["--train.lr", "--train.bptt=5"]  # no value: left as is
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--model.adaptive_cutoffs=100,150"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dynlm train: error: --model.adaptive_cutoffs: expected a list, written [100,150], "
                   "got '100,150'")
    assert main(["train", "--out", str(run), "--data.source", "jsonl"]) == 2  # the spaced value was read
    assert "data.source=jsonl needs data.path" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--train.lr"]) == 2
    assert "overrides look like --section.key=value or --section.key value" in capsys.readouterr().err
    assert not run.exists()


# ---------------------------------------------------------------- issue 16, kind 2: paths are taken literally
def test_every_string_key_keeps_exactly_the_string_given():
    from dynlm.config.messages import _bare, _hints, field_hint

    def string_keys(cls, prefix=()):
        for name, hint in _hints(cls).items():
            bare = _bare(hint)
            if hasattr(bare, "__pydantic_validator__"):
                yield from string_keys(bare, prefix + (name,))
            elif bare is str and "device" not in name:
                yield prefix + (name,)

    keys = [".".join(k) for k in string_keys(Config)]
    assert {"data.path", "data.cache_dir", "log.out_dir", "data.hub_name", "log.name"} <= set(keys)
    value = " runs/lr #1: [a], 'b' {c} yes null 1e3 "  # YAML would cut, parse or convert every part of it
    for key in keys:
        cfg = load_config([], [f"--{key}={value}"])
        section, _, name = key.rpartition(".")
        node = cfg
        for part in section.split("."):
            node = getattr(node, part)
        assert getattr(node, name) == value, key
    assert field_hint(("data", "path")) is str


def test_out_with_a_hash_writes_exactly_that_directory(tmp_path, tiny_overrides):
    from dynlm.cli import main

    short = [f"--{o}" for o in tiny_overrides] + ["--train.max_steps=2", "--train.eval_every=2"]
    for name in ("lr #1", "lr #2"):
        assert main(["train", "--out", str(tmp_path / name), *short]) == 0
    assert (tmp_path / "lr #1" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "lr #2" / "checkpoints" / "last.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("lr")) == ["lr #1", "lr #2"]


@pytest.mark.parametrize("old,new", [("train.device=cpu", "run.device"), ("train.bf16=true", "run.bf16"),
                                     ("meta.chunk=5", "eval.segment_length")])
def test_a_moved_key_is_an_error_that_names_its_new_home(old, new, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{old.split('=')[0]} is now {new}")):
        load_config([], [old])
    section, rest = old.split(".")
    (tmp_path / "old.yaml").write_text(f"{section}:\n  {rest.replace('=', ': ')}\n")
    with pytest.raises(ConfigError, match=re.escape(f"is now {new}")):
        load_config([tmp_path / "old.yaml"])


def test_a_checkpoints_config_from_before_a_move_loads_with_the_keys_in_their_new_home():
    old = {"train": {"device": "cpu", "bf16": True, "bptt": 7}, "meta": {"chunk": 5, "unroll": 3}}
    cfg = load_config([], [], base=old)
    assert (cfg.run.device, cfg.run.bf16, cfg.train.bptt) == ("cpu", True, 7)
    assert (cfg.eval.segment_length, cfg.meta.unroll) == (5, 3)  # meta-training's chunk was its segment
    both = {"meta": {"chunk": 5}, "eval": {"segment_length": 20}}
    assert load_config([], [], base=both).eval.segment_length == 20  # the evaluation's own setting stays


def test_a_token_budget_limits_the_meta_steps_like_a_step_limit():
    cfg = load_config([], ["meta.steps=7"])
    assert meta_steps(cfg) == 7  # no token budget: meta.steps
    budget = ["meta.max_tokens=61440", "meta.batch_size=8", "meta.unroll=4", "eval.segment_length=20"]
    assert meta_steps(load_config([], [*budget, "meta.steps=0"])) == 96  # 61,440 / (8 streams x 4 chunks x 20 tokens)
    assert meta_steps(load_config([], [*budget, "meta.steps=2"])) == 2  # whichever limit comes first
    assert meta_steps(load_config([], ["meta.max_tokens=10", "meta.steps=0"])) == 1  # never none
    assert meta_steps(load_config([], ["meta.steps=0", "meta.max_minutes=5"])) == 0  # the clock alone


def test_meta_training_without_any_budget_is_a_one_line_error():
    from dynlm.train.meta import check_meta_config
    with pytest.raises(ConfigError, match="nothing to meta-train: set meta.steps, meta.max_tokens or meta.max_minutes"):
        check_meta_config(load_config([], ["meta.steps=0"]))
