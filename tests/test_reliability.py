"""Issue 7 for `dynlm train`: nothing lost (SIGKILL/SIGTERM/SIGINT, corrupted or incompatible
checkpoints), bad input gets a clear one-line error, NaN/inf never reaches the weights, and
data-parallel training over torch.distributed (gloo on CPU) equals one process."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from dynlm import distributed as D
from dynlm.checkpoint import CheckpointWarning, load_checkpoint
from dynlm.cli import main
from dynlm.config import SyntheticConfig, load_config
from dynlm.data import synthetic_articles
from dynlm.data.articles import Article
from dynlm.data.streams import StreamLayout
from dynlm.data.tokenizers import WordTokenizer
from dynlm.faults import FaultGuard, NumericalFaultError
from dynlm.model import LSTMLM
from dynlm.signals import StopOnSignals
from dynlm.train.loop import Callback, callbacks

from conftest import REPO, SLOW_CHILD, TINY, run_torchrun

LONG = ["train.max_steps=40", "train.eval_every=10"]  # 4 rotating checkpoints, one epoch (~60 steps)


def train(run, overrides, *extra) -> int:
    return main(["train", "--out", str(run), *[f"--{o}" for o in overrides], *extra])


def error_line(capsys, command="train") -> str:
    """The CLI's single error line (stderr also carries progress bars and warnings)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"dynlm {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def final_params(run) -> dict:
    return load_checkpoint(Path(run) / "checkpoints" / "last.pt")["params"]


def assert_same_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def last_values(run) -> dict:
    """The last logged value of every metric (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.update({k: (rec["step"], v) for k, v in rec.items() if k not in ("step", "time")})
    return out


def assert_same_final_metrics(a, b):
    ma, mb = last_values(a), last_values(b)
    for key in ("train/loss", "valid/ppl", "train/skipped_steps"):
        assert ma[key] == mb[key], key
    sa, sb = (json.loads((Path(r) / "summary_metrics.json").read_text()) for r in (a, b))
    for key in ("best_valid_ppl", "steps", "tokens", "skipped_steps"):
        assert sa[key] == sb[key], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted LONG run: what every interrupted-and-resumed run must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    # keeps every rotating checkpoint so tests can compare intermediate states
    assert train(run, TINY + LONG + [f"data.cache_dir={cache_dir}", "train.keep_checkpoints=10"]) == 0
    return run


# ---------------------------------------------------------------- nothing lost: signals
def launch(run, overrides, delay=0.1) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", SLOW_CHILD, str(delay), "train", "--out", str(run),
                             *[f"--{o}" for o in overrides]], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child exited ({proc.returncode}) before {path.name} appeared:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, reference, cache_dir):
    overrides = TINY + LONG + [f"data.cache_dir={cache_dir}"]
    run = tmp_path / "killed"
    proc = launch(run, overrides)
    wait_for(run / "checkpoints" / "ckpt_step00000010.pt", proc)
    time.sleep(0.35)  # a few steps past the checkpoint: the kill lands between checkpoints
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert killed_at < 40, "the child finished before it was killed"
    assert not list((run / "checkpoints").glob(".*.tmp"))  # a kill mid-save leaves no half file behind
    assert train(run, overrides, "--resume") == 0
    assert_same_params(final_params(reference), final_params(run))
    assert_same_final_metrics(reference, run)


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resume_continues(tmp_path, reference, cache_dir):
    overrides = TINY + LONG + [f"data.cache_dir={cache_dir}"]
    run = tmp_path / "terminated"
    proc = launch(run, overrides)
    wait_for(run / "checkpoints" / "ckpt_step00000010.pt", proc)
    time.sleep(0.35)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "SIGTERM: stopped at step" in out
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 10 < stopped["step"] < 40 and stopped["step"] % 10  # saved at the signal, not at a validation
    assert (run / "checkpoints" / f"ckpt_step{stopped['step']:08d}.pt").is_file()
    assert train(run, overrides, "--resume") == 0
    assert_same_params(final_params(reference), final_params(run))
    assert_same_final_metrics(reference, run)


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler for the test: a shell starting pytest in the background (`cmd &`)
    hands it SIGINT ignored, and a handler restores what it found."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class InterruptAt(Callback):
    """Ctrl-C while update `step` (1-based) runs."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, state):
        if state.step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_sigint_in_process_saves_and_resumes_exactly(default_sigint, tmp_path, reference, cache_dir):
    overrides = TINY + LONG + [f"data.cache_dir={cache_dir}"]
    run = tmp_path / "interrupted"
    with callbacks(InterruptAt(7)):
        assert train(run, overrides) == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 7
    assert train(run, overrides, "--resume") == 0
    assert_same_params(final_params(reference), final_params(run))
    assert_same_final_metrics(reference, run)


def test_stop_on_signals_flag_and_second_signal(default_sigint):
    previous = signal.getsignal(signal.SIGINT)
    with StopOnSignals() as stop:
        assert not stop and stop.exit_code == 0
        os.kill(os.getpid(), signal.SIGINT)  # delivered before the next bytecode: no KeyboardInterrupt
        assert stop.requested and stop.name == "SIGINT" and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C means "now"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is previous


# ---------------------------------------------------------------- nothing lost: bad checkpoints
def test_corrupted_checkpoints_fall_back_to_the_previous_good_one(tmp_path, cache_dir, capsys):
    overrides = TINY + ["train.max_steps=30", f"data.cache_dir={cache_dir}"]
    run = tmp_path / "run"
    assert train(run, overrides) == 0
    expected = final_params(run)
    ckpts = run / "checkpoints"
    for name in ("ckpt_step00000030.pt", "last.pt"):  # e.g. a disk that filled up
        data = (ckpts / name).read_bytes()
        (ckpts / name).write_bytes(data[: len(data) // 3])
    with pytest.warns(CheckpointWarning, match=r"ckpt_step00000030\.pt .*truncated or corrupted"):
        assert train(run, overrides, "--resume") == 0
    assert f"resumed from {ckpts / 'ckpt_step00000020.pt'} at step 20" in capsys.readouterr().out
    assert load_checkpoint(ckpts / "ckpt_step00000020.pt")["step"] == 20  # the good one is still there
    assert_same_params(expected, final_params(run))  # steps 21..30 redone identically
    # nothing readable at all: a clear error, not a silent fresh start
    for p in ckpts.glob("*.pt"):
        p.write_bytes(b"garbage")
    capsys.readouterr()
    assert train(run, overrides, "--resume") == 2
    assert "no readable checkpoint" in error_line(capsys)


def test_incompatible_checkpoint_is_a_clear_error_and_is_kept(tmp_path, cache_dir, capsys):
    overrides = TINY + [f"data.cache_dir={cache_dir}"]
    run = tmp_path / "run"
    assert train(run, overrides) == 0
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    capsys.readouterr()
    assert train(run, overrides, "--resume", "--model.hidden_size=32") == 2
    err = error_line(capsys)
    assert "cannot resume from" in err and "ckpt_step00000020.pt" in err
    assert "model.hidden_size: checkpoint 24, now 32" in err

    shutil.rmtree(run / "tokenizer")
    WordTokenizer(["<eos>", "<unk>", "a", "b"]).save(run / "tokenizer")  # another run's vocabulary
    assert train(run, overrides, "--resume") == 2
    assert "vocabulary mismatch" in error_line(capsys)
    assert last.read_bytes() == before  # a refused resume touches no checkpoint

    # what may change on resume (schedule length, lr) does change without complaint
    run2 = tmp_path / "run2"
    assert train(run2, overrides) == 0
    assert train(run2, overrides, "--resume", "--train.max_steps=25", "--train.lr=1e-3") == 0
    assert load_checkpoint(run2 / "checkpoints" / "last.pt")["step"] == 25
    before = (run2 / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    assert train(run2, overrides) == 2  # forgetting --resume is an error, before anything is touched
    assert "already holds checkpoints of a static run: pass --resume" in error_line(capsys)
    assert (run2 / "checkpoints" / "last.pt").read_bytes() == before
    with pytest.warns(UserWarning, match="holds checkpoints of an earlier run"):
        assert train(run2, overrides, "--overwrite") == 0  # asked for: starts over


def test_resume_refuses_a_changed_corpus(tmp_path, cache_dir, capsys):
    corpus = tmp_path / "corpus"
    write_wikitext(corpus, n_train=8, n_valid=2)
    overrides = TINY + ["data.source=wikitext", f"data.path={corpus}", f"data.cache_dir={cache_dir}"]
    assert train(tmp_path / "run", overrides) == 0
    with open(corpus / "train.txt", "a") as f:  # someone appends to the corpus file in place
        f.write(" = Extra = \n \n extra text . \n \n")
    capsys.readouterr()
    assert train(tmp_path / "run", overrides, "--resume") == 2
    assert "training data changed" in error_line(capsys)


# ---------------------------------------------------------------- bad input
def write_wikitext(d: Path, n_train=8, n_valid=2, min_tokens=100, max_tokens=300):
    """A small WikiText-format corpus (generated, never committed)."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = SyntheticConfig(n_train=n_train, n_valid=n_valid, n_test=1, min_tokens=min_tokens, max_tokens=max_tokens)
    for split in ("train", "valid"):
        lines = [line for a in synthetic_articles(cfg, split) for line in a.lines]
        (d / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def run_on_corpus(tmp_path, corpus, *extra):
    return train(tmp_path / "run", TINY + ["data.source=wikitext", f"data.path={corpus}",
                                           f"data.cache_dir={tmp_path / 'cache'}"], *extra)


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "train.txt").write_bytes(b""), r"train\.txt is empty"),
    (lambda d: (d / "train.txt").write_bytes(b" \n  \n"), r"train\.txt is empty"),
    (lambda d: (d / "valid.txt").write_bytes((d / "valid.txt").read_bytes()[:50] + b"\xc3\x28 rest\n"),
     r"valid\.txt: invalid UTF-8 at byte offset 50"),
    (lambda d: (d / "valid.txt").unlink(), r"no 'valid' split in WikiText directory .*valid\.txt"),
])
def test_bad_corpus_is_one_clear_line(tmp_path, capsys, damage, message):
    corpus = write_wikitext(tmp_path / "corpus")
    damage(corpus)
    assert run_on_corpus(tmp_path, corpus) == 2
    err = error_line(capsys)
    assert re.search(message, err), err


def test_corpus_without_titles_is_one_article_with_a_warning(tmp_path):
    corpus = write_wikitext(tmp_path / "corpus")
    text = (corpus / "train.txt").read_text()
    (corpus / "train.txt").write_text("\n".join(l for l in text.split("\n") if not l.startswith(" = ")) + "\n")
    with pytest.warns(UserWarning, match="train: no article title found; using the whole text as one article"):
        assert run_on_corpus(tmp_path, corpus) == 0
    summary = json.loads((tmp_path / "run" / "summary_metrics.json").read_text())
    assert summary["steps"] == 20 and summary["best_valid_ppl"] < float("inf")


def test_articles_shorter_than_a_chunk_train_and_every_token_scored_once(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, n in (("train", 30), ("valid", 7)):  # every article ~10 tokens, bptt/segment 35
        lines = [" "] + [x for i in range(n) for x in (f" = T{i} = ", " ", f" w{i % 5} is a thing . ", " ")]
        (corpus / f"{split}.txt").write_text("\n".join(lines) + "\n")
    common = ["train.bptt=35", "eval.segment_length=35", "train.max_steps=0", "train.epochs=1"]
    assert run_on_corpus(tmp_path, corpus, *[f"--{o}" for o in common]) == 0
    from dynlm.data import read_wikitext_dir
    from dynlm.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tmp_path / "run" / "tokenizer")
    train_tokens = sum(len(tok.encode_article(a)) for a in read_wikitext_dir(corpus, "train"))
    summary = json.loads((tmp_path / "run" / "summary_metrics.json").read_text())
    assert summary["tokens"] == train_tokens  # one epoch trained on every token exactly once
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best.pt"), "--out", str(out),
                 f"--data.cache_dir={tmp_path / 'cache'}"]) == 0
    import pyarrow.parquet as pq

    tokens = pq.read_table(out / "tokens.parquet").to_pandas()
    valid = [tok.encode_article(a) for a in read_wikitext_dir(corpus, "valid")]
    assert all(len(a) < 35 for a in valid)
    assert len(tokens) == sum(len(a) for a in valid) == len(tokens.drop_duplicates(["article_id", "position"]))


def test_sentencepiece_size_below_what_the_corpus_allows_says_the_smallest_and_builds_nothing(tmp_path, capsys):
    """Issue 16, kind 3: not sentencepiece's raw RuntimeError, and no empty RUN/tokenizer/ left behind to
    break the corrected rerun; the error says the size to use."""
    run = tmp_path / "run"
    overrides = TINY + [f"data.cache_dir={tmp_path / 'c'}", "data.tokenizer=sentencepiece"]
    assert train(run, overrides + ["data.sp_vocab_size=5"]) == 2
    err = error_line(capsys)
    smallest = int(re.search(r"data\.sp_vocab_size=5 is below the smallest size this training text allows, (\d+)",
                             err).group(1))
    assert 5 < smallest < 100 and f"set data.sp_vocab_size={smallest} or more" in err
    assert not run.exists() and not list(tmp_path.glob(".*tmp"))  # nothing half-built, no temp dirs
    assert train(run, overrides + [f"data.sp_vocab_size={smallest}"]) == 0  # the corrected rerun just works
    assert json.loads((run / "tokenizer" / "tokenizer.json").read_text())["vocab_size"] == smallest
    big = tmp_path / "big"  # above what the text supports: fewer pieces, said once, not an error
    assert train(big, overrides + ["data.sp_vocab_size=100000"]) == 0
    assert "more than this training text supports; the tokenizer has" in capsys.readouterr().err


def test_a_tokenizer_is_saved_whole_or_not_at_all(tmp_path, monkeypatch):
    tok = WordTokenizer(["<eos>", "<unk>", "a"])

    def fail(self, out):  # e.g. the disk fills up half-way
        (out / "vocab.txt").write_text("<eos>\n")
        raise OSError("No space left on device")

    monkeypatch.setattr(WordTokenizer, "_save", fail)
    with pytest.raises(OSError):
        tok.save(tmp_path / "tokenizer")
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a temporary one
    monkeypatch.undo()
    tok.save(tmp_path / "tokenizer")
    WordTokenizer(["<eos>", "<unk>", "b", "c"]).save(tmp_path / "tokenizer")  # replaced as a whole
    assert (tmp_path / "tokenizer" / "vocab.txt").read_text(encoding="utf-8").split() == ["<eos>", "<unk>", "b", "c"]
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]


def test_a_non_ascii_title_under_the_c_locale_loses_nothing(tmp_path):
    """Issue 16, kind 5: with LC_ALL=C (ASCII) every file is still read and written as UTF-8, a byte-order
    mark is not text, and the results of an evaluation are written whole."""
    corpus, bom = tmp_path / "corpus", b"\xef\xbb\xbf"
    small = SyntheticConfig(n_train=8, n_valid=2, n_test=1, min_tokens=100, max_tokens=300)
    for split in ("train", "valid"):
        (corpus / split).mkdir(parents=True)
        for i, a in enumerate(synthetic_articles(small, split)):
            (corpus / split / f"{i}.txt").write_text("\n".join(a.lines) + "\n", encoding="utf-8")
        (corpus / split / "cafe.txt").write_bytes(bom + " = Café = \n \n Le café est noir . \n".encode())
    overrides = TINY + ["data.source=text", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert train(tmp_path / "run", overrides) == 0
    config = tmp_path / "café.yaml"
    config.write_bytes(bom + "# réglages\neval:\n  batch_size: 2\nlog:\n  name: Café\n".encode())
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "eval"
    p = subprocess.run([sys.executable, "-m", "dynlm", "evaluate", "--checkpoint",
                        str(tmp_path / "run" / "checkpoints" / "best.pt"), "--out", str(out), "--config", str(config),
                        "--modes", "static,sgd", f"--data.cache_dir={tmp_path / 'cache'}"],
                       cwd=REPO, env=env, capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    titles = {row["title"] for row in csv.DictReader(open(out / "per_article.csv", encoding="utf-8", newline=""))}
    assert "Café" in titles
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["modes"]["sgd"]["ppl"] > 1
    assert "Café" in (out / "heatmap.html").read_text(encoding="utf-8")
    assert "name: Café" in (out / "config.yaml").read_text(encoding="utf-8")


def test_tokenizer_kind_of_run_dir_must_match_config(tmp_path, capsys):
    WordTokenizer(["<eos>", "<unk>", "a"]).save(tmp_path / "run" / "tokenizer")
    assert train(tmp_path / "run", TINY + [f"data.cache_dir={tmp_path / 'c'}", "data.tokenizer=sentencepiece"]) == 2
    assert "holds a word tokenizer but data.tokenizer=sentencepiece" in error_line(capsys)


@pytest.mark.parametrize("args,message", [
    (["--train.lrr=1"], "unknown config key"),
    (["--train.batch_size=abc"], "train.batch_size: expected int"),
    (["--train.boundary=sometimes"], "train.boundary: 'sometimes' is not one of reset, continuous"),
    (["--model.softmax=sparse"], "model.softmax: 'sparse' is not one of full, adaptive"),
    (["--train.batch_size=0"], "--train.batch_size: must be >= 1, got 0"),
    (["--train.max_bad_steps=0"], "--train.max_bad_steps: must be >= 1, got 0"),
    (["--run.device=gpu"], "--run.device: 'gpu': expected auto, cpu, cuda or cuda:N"),
    (["--config", "experiments/no_such_experiment.yaml"], "config file not found"),
])
def test_bad_config_on_the_command_line_is_one_line_and_creates_nothing(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *args]) == 2
    assert message in error_line(capsys)
    assert not run.exists()


def test_wrong_type_in_an_experiment_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "exp.yaml"
    bad.write_text("train:\n  lr: fast\n")
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(bad)]) == 2
    err = error_line(capsys)
    assert "exp.yaml" in err and "train.lr: expected float" in err


@pytest.fixture
def wandb_sandbox(tmp_path, monkeypatch):
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb
    return wandb


def test_training_survives_wandb_auth_failure(tmp_path, wandb_sandbox, monkeypatch):
    def refuse(*a, **k):
        raise wandb_sandbox.errors.AuthenticationError("invalid API key")

    monkeypatch.setattr(wandb_sandbox, "init", refuse)
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="wandb init failed.*invalid API key"):
        assert train(run, TINY + [f"data.cache_dir={tmp_path / 'c'}", "log.wandb_mode=online"]) == 0
    assert last_values(run)["valid/ppl"][0] == 20  # the local log has the whole run


def test_training_survives_wandb_network_failure_mid_run(tmp_path, wandb_sandbox, monkeypatch):
    class FlakyRun:  # connects, then the network goes away
        summary = {}

        def log(self, *a, **k):
            raise ConnectionError("network is unreachable")

        def finish(self, *a, **k):
            pass

    monkeypatch.setattr(wandb_sandbox, "init", lambda *a, **k: FlakyRun())
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="wandb log failed.*unreachable") as record:
        assert train(run, TINY + [f"data.cache_dir={tmp_path / 'c'}", "log.wandb_mode=online"]) == 0
    assert sum("wandb" in str(w.message) for w in record) == 1  # warned once, then local only
    assert last_values(run)["valid/ppl"][0] == 20


# ---------------------------------------------------------------- numerical faults
def test_fault_guard_counts_resets_and_stops():
    g = FaultGuard(max_consecutive=3, verbose=False)
    assert g.check(1, loss=torch.tensor(2.0), grad_norm=torch.tensor(1.0))
    assert not g.check(2, loss=float("nan"), grad_norm=1.0)
    assert not g.check(3, loss=1.0, grad_norm=torch.tensor(float("inf")))
    assert g.check(4, loss=1.0, grad_norm=1.0) and (g.skipped, g.consecutive) == (2, 0)
    assert not g.check(5, loss=float("inf")) and not g.check(6, loss=float("nan"))
    restored = FaultGuard(max_consecutive=3, verbose=False)
    restored.load_state_dict(g.state_dict())
    with pytest.raises(NumericalFaultError, match=r"3 consecutive non-finite steps \(steps 5\.\.7"):
        restored.check(7, grad_norm=float("nan"))


class NaNGradient(torch.autograd.Function):
    """Identity forward; NaN backward: a finite loss whose gradient is poisoned."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class Faults(Callback):
    """Training step i (1-based) gets faults[i]: 'nan_loss', 'inf_loss' or 'nan_grad' (a finite loss
    whose gradient is NaN). Validation has no training loss and is never touched."""

    def __init__(self, faults: dict):
        self.faults = faults

    def on_loss(self, state, loss):
        kind = self.faults.get(state.step + 1)
        if kind is None:
            return loss
        if kind == "nan_grad":
            return NaNGradient.apply(loss)
        return loss * {"nan_loss": float("nan"), "inf_loss": float("inf")}[kind]


def test_all_bad_steps_never_touch_the_weights(tmp_path):
    run = tmp_path / "run"
    with callbacks(Faults({i: "nan_loss" for i in range(1, 100)})):
        assert train(run, TINY + [f"data.cache_dir={tmp_path / 'c'}", "train.max_steps=6", "train.eval_every=3",
                                  "train.max_bad_steps=100"]) == 0
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    cfg = load_config(overrides=TINY)
    init = LSTMLM(cfg.model, ck["vocab_size"]).init_params(cfg.train.seed)
    assert_same_params(init, ck["params"])  # every update was skipped, AdamW's decay included
    assert ck["faults"]["skipped"] == 6 and last_values(run)["train/skipped_steps"] == (6, 6)
    assert last_values(run)["valid/ppl"][1] < float("inf")


def test_isolated_faults_are_skipped_and_training_goes_on(tmp_path, capsys):
    run = tmp_path / "run"
    with callbacks(Faults({5: "nan_grad", 8: "inf_loss", 9: "nan_loss"})):
        assert train(run, TINY + [f"data.cache_dir={tmp_path / 'c'}", "train.max_bad_steps=3"]) == 0
    assert "step 5: non-finite grad_norm=nan, update skipped" in capsys.readouterr().err
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["faults"]["skipped"] == 3 and ck["step"] == 20
    assert all(torch.isfinite(v).all() for v in ck["params"].values())
    assert all(torch.isfinite(s["exp_avg"]).all() for s in ck["optimizer"]["state"].values())
    losses = [json.loads(l).get("train/loss") for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(x is None or x == x and x < float("inf") for x in losses)


def test_repeated_faults_stop_the_run_keeping_the_checkpoint_before_them(tmp_path, capsys, reference):
    run = tmp_path / "run"
    overrides = TINY + LONG + [f"data.cache_dir={tmp_path / 'c'}", "train.max_bad_steps=3"]
    with callbacks(Faults({i: "nan_loss" for i in range(12, 100)})):
        assert train(run, overrides) == 3
    err = capsys.readouterr().err
    assert "3 consecutive non-finite steps (steps 12..14" in err and "Traceback" not in err
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert ckpts == ["best.pt", "ckpt_step00000010.pt", "last.pt"]
    # the surviving checkpoint is exactly the clean run's step-10 state
    clean = load_checkpoint(reference / "checkpoints" / "ckpt_step00000010.pt")["params"]
    assert_same_params(clean, final_params(run))


# ---------------------------------------------------------------- torch.distributed
def toy_articles(lengths):
    return [Article(f"a{i}", f"T{i}", torch.randint(1, 50, (n,)).numpy().astype("int32"), n)
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("n,world", [(4, 2), (5, 2), (7, 3), (3, 3)])
def test_shards_are_disjoint_and_cover_everything(n, world):
    blocks = [range(n)[D.shard_slice(n, r, world)] for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n)) and all(len(b) >= 1 for b in blocks)
    arts = toy_articles([13, 40, 7, 22, 5, 31, 9, 17][: n + 1])
    layout = StreamLayout(arts, n, 6, eos_id=0)
    seen = []
    for r in range(world):
        mine = layout.select_streams(D.shard_slice(layout.n_streams, r, world))
        assert len(mine) == len(layout)  # same number of steps on every rank
        ids = {int(a) for c in mine for a in c.article[c.mask].tolist()}
        seen.append(ids)
    assert set().union(*seen) == set(range(len(arts))) and sum(map(len, seen)) == len(arts)


NO_DROPOUT = ["model.dropout_input=0", "model.dropout_hidden=0", "model.dropout_output=0"]


def torchrun(run, overrides, *extra) -> str:
    """`dynlm train` in two gloo processes; rank 0's stdout (see conftest.run_torchrun)."""
    logs = Path(tempfile.mkdtemp(prefix="torchrun-logs-", dir=Path(run).parent))
    return run_torchrun(["train", "--out", str(run), *[f"--{o}" for o in overrides], *extra], logs)


@pytest.mark.slow
def test_two_gloo_processes_take_the_same_step_as_one(tmp_path, cache_dir):
    overrides = TINY + NO_DROPOUT + ["train.max_steps=1", f"data.cache_dir={cache_dir}"]
    assert train(tmp_path / "one", overrides) == 0
    stdout = torchrun(tmp_path / "two", overrides)
    assert "2 processes (gloo)" in stdout
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert two["world_size"] == 2 and len(two["rng_per_rank"]) == 2
    # float32: per-rank partial sums change only the summation order of the loss and gradients
    # (measured gap ~1e-8, one float32 ulp of these weights)
    for k in one["params"]:
        torch.testing.assert_close(two["params"][k], one["params"][k], rtol=1e-6, atol=1e-7, msg=k)
    assert [h.shape[0] for h, _ in two["hidden"]] == [h.shape[0] for h, _ in one["hidden"]]  # all 4 streams saved
    for (h1, c1), (h2, c2) in zip(one["hidden"], two["hidden"]):
        torch.testing.assert_close(h2, h1, rtol=1e-6, atol=1e-7)
    assert two["best_valid_ppl"] == pytest.approx(one["best_valid_ppl"], rel=1e-5)


@pytest.mark.slow
def test_two_process_resume_is_exact_and_needs_the_same_world_size(tmp_path, cache_dir, capsys):
    overrides = TINY + ["train.max_steps=6", "train.eval_every=3", f"data.cache_dir={cache_dir}"]
    run = tmp_path / "run"
    torchrun(run, overrides)
    expected = final_params(run)
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "ckpt_step00000003.pt", ckpts / "last.pt")  # as if it had died after step 3
    (ckpts / "ckpt_step00000006.pt").unlink()
    assert train(run, overrides, "--resume") == 2  # one process cannot continue a two-process run
    assert "written by 2 process(es), resumed with 1" in capsys.readouterr().err
    stdout = torchrun(run, overrides, "--resume")
    assert "resumed from" in stdout and "step 3" in stdout
    assert_same_params(expected, final_params(run))


def _collectives_worker(rank: int, world: int, store_file: str):
    """Runs in each spawned process: every helper against a real 2-process gloo group."""
    import torch.distributed as dist

    from dynlm.checkpoint import rng_state

    torch.manual_seed(rank)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        assert (D.rank(), D.world_size(), D.is_main()) == (rank, 2, rank == 0)
        assert D.all_reduce_sum(rank + 1) == 3 and D.all_reduce_sum(0.5) == 1.0
        assert D.any_true(rank == 1) and not D.any_true(False)
        assert D.max_floats([float(rank), -float(rank)]) == [1.0, 0.0]
        assert D.broadcast_object({"path": f"from {rank}"}) == {"path": "from 0"}
        states = D.gather_objects(rng_state())  # uint8/int64 tensors inside
        assert len(states) == 2 and torch.equal(states[rank]["torch"], torch.get_rng_state())
        assert not torch.equal(states[0]["torch"], states[1]["torch"])
        # grads: p0 on both ranks, p1 only on rank 0 (e.g. an unused softmax cluster), p2 nowhere
        p = [torch.zeros(3, requires_grad=True) for _ in range(3)]
        p[0].grad = torch.full((3,), float(rank + 1))
        if rank == 0:
            p[1].grad = torch.ones(3)
        D.all_reduce_grads(p, divisor=2.0)
        assert torch.equal(p[0].grad, torch.full((3,), 1.5))  # (1 + 2) / 2
        assert torch.equal(p[1].grad, torch.full((3,), 0.5))  # rank 1 contributed zeros
        assert p[2].grad is None  # the optimizer skips it, as a single process would
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_helpers_on_two_gloo_processes(tmp_path):
    torch.multiprocessing.spawn(_collectives_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def test_a_process_launched_by_torchrun_ends_without_the_interpreter_teardown(monkeypatch, capsys):
    # a finished gloo rank was seen to abort in that teardown, which fails the whole torchrun
    ended = []
    monkeypatch.setattr(D.os, "_exit", ended.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.end_launched_process(3) == 3 and ended == []  # a plain process returns its status
    monkeypatch.setenv("WORLD_SIZE", "2")
    D.end_launched_process(3)
    assert ended == [3]
    main(["config", "--model.hidden_size=8"])  # every command's status goes the same way
    assert ended == [3, 0] and "hidden_size: 8" in capsys.readouterr().out
    main(["config", "--model.hidden_size=-1"])  # also an error's
    assert ended == [3, 0, 2]
