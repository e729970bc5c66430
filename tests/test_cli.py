"""The command line as a newcomer meets it: help with defaults in workflow order, `--version`,
`dynlm config` (every key with its default and doc), the next command named at the end, and
progress bars that stay out of log files."""
import dataclasses
import io
import re
import subprocess
import sys
import typing

import pytest
import yaml

import dynlm
from conftest import REPO
from dynlm.cli import main
from dynlm.config import Config, load_config
from dynlm.config_doc import field_docs, render_config
from dynlm.progress import progress


def help_text(*command: str) -> None:
    """Print `dynlm COMMAND --help` (argparse then exits)."""
    with pytest.raises(SystemExit):
        main([*command, "--help"])


def test_help_shows_defaults_and_lists_commands_in_workflow_order(capsys):
    help_text()
    top = capsys.readouterr().out
    listed = re.findall(r"^    ([a-z-]+)\b", top, re.M)
    assert listed[:5] == ["train", "metatrain", "tune", "evaluate", "report"]
    assert "train -> metatrain -> tune -> evaluate -> report" in top and "dynlm demo" in top
    help_text("evaluate")
    evaluate = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "(default: valid)" in evaluate and "(default: static)" in evaluate
    assert "(default: RUN/eval_SPLIT" in evaluate
    assert "learned modes (learned, learned+cache) need a metatrain checkpoint" in evaluate
    assert "(default: None)" not in evaluate and "(default: False)" not in evaluate and "(default: [])" not in evaluate
    help_text("demo")
    demo = " ".join(capsys.readouterr().out.split())
    assert "meta-trains the learned update rule" in demo and "tunes every baseline" in demo
    help_text("experiment")
    assert "(default: cpu)" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"dynlm {dynlm.__version__}"


def sections(cls):
    """`cls` and every dataclass nested in it."""
    yield cls
    for hint in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(hint):
            yield from sections(hint)


def test_every_config_key_has_a_one_line_doc():
    for cls in list(sections(Config))[1:]:  # Config's own fields are the sections, with docstrings
        undocumented = [k for k, doc in field_docs(cls).items() if not doc]
        assert not undocumented, (cls.__name__, undocumented)
    assert field_docs(typing.get_type_hints(Config)["train"])["warmup_steps"] == "linear warmup of the learning rate"


def test_config_prints_the_resolved_config_with_docs_and_defaults(tmp_path, capsys):
    assert main(["config", "--train.lr=1e-3", "--model.adaptive_cutoffs=[100,200]", "--protocol", "krause"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  lr: 0\.001 +# AdamW peak learning rate; default 0\.003$", text, re.M)
    assert re.search(r"^  warmup_steps: 100 +# linear warmup of the learning rate$", text, re.M)
    assert re.search(r"^  segment_length: 5 +# .*default 20$", text, re.M)  # the krause preset
    assert re.search(r"^  softmax: full +# full \(tied\) \| adaptive$", text, re.M)
    assert re.search(r"^  boundary: continuous +# .*default reset", text, re.M)
    assert "# `dynlm train`: the static LM" in text  # each section opens with its docstring
    (tmp_path / "my.yaml").write_text(text)  # a --config file giving the same config back
    expected = load_config([REPO / "dynlm" / "presets" / "protocol_krause.yaml"],
                           ["train.lr=1e-3", "model.adaptive_cutoffs=[100,200]"])
    assert load_config([tmp_path / "my.yaml"]) == expected
    assert main(["config", "--section", "rule"]) == 0
    only = yaml.safe_load(capsys.readouterr().out)
    assert list(only) == ["rule"] and only["rule"]["sgd_lr"] == 0.05
    assert main(["config", "--section", "nope"]) == 2
    assert capsys.readouterr().err.startswith("dynlm config: error: --section nope: not a config section")


def test_render_config_round_trips_every_value_type(tmp_path):
    cfg = load_config([], ["data.path=my texts", "log.tags=[a,b]", "rule.dyneval_lr=3e-5", "run.bf16=true",
                           "tune.dyneval_lamb=[0.001,0.002]"])
    (tmp_path / "c.yaml").write_text(render_config(cfg))
    assert load_config([tmp_path / "c.yaml"]) == cfg


def test_progress_bars_draw_on_a_terminal_only(monkeypatch):
    """Issue 17: `cmd > log 2>&1` mixed the bars' carriage returns into the result lines."""
    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    for tty in (True, False):
        stream = Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        for _ in progress(range(3), desc="x", mininterval=0):
            pass
        assert ("\r" in stream.getvalue()) == tty
    stream = Stream(True)
    monkeypatch.setattr(sys, "stderr", stream)
    for _ in progress(range(3), enabled=False):
        pass
    assert stream.getvalue() == ""


def test_a_command_logged_to_a_file_has_no_bar_characters(tmp_path):
    """The real thing: `dynlm train ... > log 2>&1`, then the log read back."""
    from conftest import TINY
    log = tmp_path / "log"
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "dynlm", "train", "--out", str(tmp_path / "run"),
                             *[f"--{o}" for o in TINY], f"--data.cache_dir={tmp_path / 'cache'}"],
                            stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    text = log.read_text()
    assert rc == 0, text
    assert "\r" not in text and "\x1b[" not in text
    assert "[step 20] train/lr=" in text and "best valid ppl" in text and "next: dynlm metatrain" in text
