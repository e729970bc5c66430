"""Meta-training end to end on the tiny synthetic corpus: the learned rule beats the static model,
an interrupted run resumes bit-exactly, NaNs are skipped, and EWC holds the weights near theta0."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import shutil

import pytest
import torch

from conftest import REPO, SLOW_CHILD, TINY, run_torchrun
from dynlm.checkpoint import load_checkpoint, save_checkpoint
from dynlm.cli import main
from dynlm.config import load_config
from dynlm.data.sources import load_articles
from dynlm.data.tokenizers import load_tokenizer
from dynlm.prequential import score
from dynlm.model import LSTMLM
from dynlm.rules import make_rule
from dynlm.train.loop import Callback, callbacks

META = ["meta.unroll=2", "meta.batch_size=4", "meta.log_every=1", "meta.valid_articles=1",
        "meta.lr=0.05", "meta.theta0_lr=0", "rule.init_lr=0.003", "eval.segment_length=10"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_dir):
    """A static LM trained a little longer than the tiny default, so there is structure to adapt."""
    run = tmp_path_factory.mktemp("base") / "run"
    # articles built mostly from their own topic words: what only adaptation can exploit
    args = [f"--{o}" for o in TINY + [f"data.cache_dir={cache_dir}", "train.max_steps=80", "train.eval_every=80",
                                      "data.synthetic.topic_share=0.6", "model.emb_size=32", "model.hidden_size=48"]]
    assert main(["train", "--out", str(run), *args]) == 0
    return run / "checkpoints" / "best.pt"


def metatrain(base, out, cache_dir, *extra) -> int:
    return main(["metatrain", "--init", str(base), "--out", str(out), f"--data.cache_dir={cache_dir}",
                 *[f"--{o}" for o in META], *extra])


def test_meta_training_beats_static_on_held_out_articles(base, cache_dir, tmp_path):
    assert metatrain(base, tmp_path / "meta", cache_dir, "--meta.steps=60", "--meta.lr=0.1") == 0
    ck = load_checkpoint(tmp_path / "meta" / "checkpoints" / "last.pt")
    cfg = load_config([], [], base=ck["config"])
    tok = load_tokenizer(tmp_path / "meta" / "tokenizer")
    articles = load_articles(cfg.data, "test", tok)  # articles neither model has seen
    lm = LSTMLM(cfg.model, tok.vocab_size)
    names = lm.lstm_names()
    kw = dict(eos_id=tok.eos_id, segment_length=10, batch_size=3)
    static = score(lm, ck["params"], articles, **kw)
    learned = score(lm, ck["params"], articles, rule=make_rule("learned", cfg.rule, names, learner_state=ck["learner"]),
                    names=names, **kw)
    lengths = np.array([len(a) for a in articles])
    second_half = static.position >= lengths[static.article] // 2  # where adaptation has had time to act
    gain = static.nll[second_half].mean() - learned.nll[second_half].mean()
    untrained = score(lm, ck["params"], articles, rule=make_rule("learned", cfg.rule, names), names=names, **kw)
    untrained_gain = static.nll[second_half].mean() - untrained.nll[second_half].mean()
    print(f"second-half gain over static: untrained learner {untrained_gain:.4f}, meta-trained {gain:.4f} nats/token")
    assert gain > 0.05 and gain > 2 * untrained_gain, f"learned rule gains only {gain:.4f} nats/token over static"


def final_state(run):
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    return ck["step"], ck["learner"], ck["params"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_metatrain(base, cache_dir, tmp_path):
    args = [f"--data.cache_dir={cache_dir}", "--meta.steps=12", "--meta.checkpoint_every=3",
            "--meta.keep_checkpoints=10", *[f"--{o}" for o in META]]
    reference = tmp_path / "reference"
    assert main(["metatrain", "--init", str(base), "--out", str(reference), *args]) == 0
    run = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, "0.1", "metatrain", "--init", str(base), "--out", str(run),
                             *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = run / "checkpoints" / "ckpt_step00000003.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(0.3)  # a few chunk steps past the checkpoint
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert killed_at < 12, "the child finished before it was killed"
    assert main(["metatrain", "--init", str(base), "--out", str(run), "--resume", *args]) == 0
    (s_a, learner_a, params_a), (s_b, learner_b, params_b) = final_state(reference), final_state(run)
    assert s_a == s_b == 12
    for k in learner_a:
        assert torch.equal(learner_a[k], learner_b[k]), k
    for k in params_a:
        assert torch.equal(params_a[k], params_b[k]), k


def test_resume_checks_the_data_signature_and_still_takes_checkpoints_without_one(base, cache_dir, tmp_path, capsys):
    """Meta checkpoints hold the data signature since the shared run loop; older ones (without it, and
    without per-rank RNG) still resume exactly, and a signature that disagrees is refused."""
    args = ["--meta.steps=4", "--meta.checkpoint_every=2", "--meta.keep_checkpoints=10"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert metatrain(base, reference, cache_dir, *args) == 0
    shutil.copytree(reference, run)
    ckpts = run / "checkpoints"
    ck = load_checkpoint(ckpts / "ckpt_step00000002.pt")
    assert ck["data_signature"]["n_articles"] > 0

    def rewind_to(state):  # as if the run had died right after step 2, with `state` on disk
        for p in ckpts.glob("*.pt"):
            p.unlink()
        save_checkpoint(state, ckpts / "ckpt_step00000002.pt")
        save_checkpoint(state, ckpts / "last.pt")

    rewind_to({k: v for k, v in ck.items() if k not in ("data_signature", "rng_per_rank")})
    assert metatrain(base, run, cache_dir, *args, "--resume") == 0
    (s_a, learner_a, params_a), (s_b, learner_b, params_b) = final_state(reference), final_state(run)
    assert s_a == s_b == 4
    assert all(torch.equal(learner_a[k], learner_b[k]) for k in learner_a)
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    rewind_to({**ck, "data_signature": {"n_articles": 1, "n_tokens": 1}})
    capsys.readouterr()
    assert metatrain(base, run, cache_dir, *args, "--resume") == 2
    assert "training data changed" in capsys.readouterr().err


class NaNLossAt(Callback):
    """Meta-step `step` (1-based) gets a NaN meta-loss."""

    def __init__(self, step: int):
        self.step = step

    def on_loss(self, state, loss):
        return loss * float("nan") if state.step + 1 == self.step else loss


def test_nan_meta_loss_is_skipped_and_the_learner_stays_finite(base, cache_dir, tmp_path, capsys):
    with callbacks(NaNLossAt(2)):
        assert metatrain(base, tmp_path / "meta", cache_dir, "--meta.steps=4") == 0
    ck = load_checkpoint(tmp_path / "meta" / "checkpoints" / "last.pt")
    assert ck["faults"]["skipped"] == 1 and ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["learner"].values())
    assert all(torch.isfinite(v).all() for v in ck["reader"]["fast"].values())
    assert "update skipped" in capsys.readouterr().err


def test_metatrain_with_unroll_1_moves_the_learner(base, cache_dir, tmp_path):
    """K=1: the only chunk of each meta-step is scored with the update the previous step held back
    at truncation, replayed in this step's graph; without that its meta-gradient was exactly zero.
    Its budget is given in tokens: 160 / (4 streams x 1 chunk x 10 tokens) = 4 meta-steps."""
    assert metatrain(base, tmp_path / "k1", cache_dir, "--meta.unroll=1", "--meta.max_tokens=160", "--meta.lr=0.1",
                     "--rule.compile=false") == 0
    ck = load_checkpoint(tmp_path / "k1" / "checkpoints" / "last.pt")
    cfg = load_config([], [], base=ck["config"])
    names = list(ck["reader"]["fast"])
    untrained = make_rule("learned", cfg.rule, names).state_dict()
    moved = [k for k, v in ck["learner"].items() if not torch.equal(v, untrained[k])]
    assert moved, "the learner did not move: no meta-gradient at K=1"
    assert ck["step"] == 4 and set(ck["reader"]["held"]) >= {"drift", "grads", "rule_state", "loss", "active"}


def drift(run) -> float:
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    return max(float((w - ck["params"][k]).abs().mean()) for k, w in ck["reader"]["fast"].items())


def test_ewc_holds_the_fast_weights_closer_to_theta0(base, cache_dir, tmp_path):
    common = ["--meta.steps=8", "--meta.boundary=continuous", "--meta.theta0_lr=0", "--meta.lr=0.2",
              "--rule.init_lr=0.01"]
    assert metatrain(base, tmp_path / "plain", cache_dir, *common) == 0
    assert metatrain(base, tmp_path / "ewc", cache_dir, *common, "--meta.ewc_lambda=100", "--meta.ewc_chunks=5") == 0
    assert drift(tmp_path / "ewc") < 0.8 * drift(tmp_path / "plain")
    # the learner reads F per coordinate (as F / mean F); the checkpoint keeps it, and the rule built
    # from the checkpoint for evaluation reads the same F
    ck = load_checkpoint(tmp_path / "ewc" / "checkpoints" / "last.pt")
    cfg = load_config([], [], base=ck["config"])
    names = list(ck["reader"]["fast"])
    rule = make_rule("learned", cfg.rule, names, learner_state=ck["learner"])
    assert set(rule.consolidation) == set(names)
    mean = torch.cat([f.flatten() for f in rule.consolidation.values()]).mean()
    assert float(mean) == pytest.approx(1.0, rel=1e-5)
    assert not any(k.startswith("consolidation.") for k in rule.state_dict())
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")
    assert make_rule("learned", cfg.rule, names, learner_state=plain["learner"]).consolidation is None


def test_the_fisher_input_and_the_ewc_penalty_come_apart(base, cache_dir, tmp_path):
    """meta.consolidation isolates the two roles of F: `input` (the learner reads F, no penalty) and
    `penalty` (the penalty pulls the fast weights in, the learner does not read F)."""
    common = ["--meta.steps=8", "--meta.boundary=continuous", "--meta.theta0_lr=0", "--meta.lr=0.2",
              "--rule.init_lr=0.01", "--meta.ewc_chunks=5"]
    assert metatrain(base, tmp_path / "plain", cache_dir, *common) == 0
    assert metatrain(base, tmp_path / "input", cache_dir, *common, "--meta.consolidation=input") == 0
    assert metatrain(base, tmp_path / "penalty", cache_dir, *common, "--meta.consolidation=penalty",
                     "--meta.ewc_lambda=100") == 0

    def reads_fisher(run) -> bool:
        ck = load_checkpoint(run / "checkpoints" / "last.pt")
        cfg = load_config([], [], base=ck["config"])
        return make_rule("learned", cfg.rule, list(ck["reader"]["fast"]), learner_state=ck["learner"]).consolidation is not None
    assert reads_fisher(tmp_path / "input") and not reads_fisher(tmp_path / "penalty")
    assert drift(tmp_path / "penalty") < 0.8 * drift(tmp_path / "plain")  # the penalty alone holds them in
    assert drift(tmp_path / "input") > 0.8 * drift(tmp_path / "plain")  # the input alone does not pull


@pytest.mark.parametrize("args, says", [
    (["--meta.ewc_lambda=1"], "continuous"),  # EWC outside continuous reading
    (["--meta.consolidation=input"], "continuous"),
    (["--meta.boundary=continuous", "--meta.consolidation=penalty"], "ewc_lambda"),  # a penalty weighed by 0
])
def test_consolidation_outside_its_setting_is_a_config_error(base, cache_dir, tmp_path, capsys, args, says):
    assert metatrain(base, tmp_path / "bad", cache_dir, *args) == 2
    assert says in capsys.readouterr().err


@pytest.mark.slow
def test_two_gloo_processes_take_the_same_meta_step_as_one(base, cache_dir, tmp_path):
    args = [f"--data.cache_dir={cache_dir}", "--meta.steps=2", "--meta.checkpoint_every=1",
            *[f"--{o}" for o in META]]
    assert main(["metatrain", "--init", str(base), "--out", str(tmp_path / "one"), *args]) == 0
    run_torchrun(["metatrain", "--init", str(base), "--out", str(tmp_path / "two"), *args], tmp_path / "logs")
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert two["world_size"] == 2 and two["step"] == one["step"] == 2
    # each rank reads half the streams; the all-reduced meta-gradient is the single process's
    # up to float32 summation order
    for k in one["learner"]:
        torch.testing.assert_close(two["learner"][k], one["learner"][k], rtol=1e-5, atol=1e-6, msg=k)
    for k in one["reader"]["fast"]:  # all 4 streams' fast weights were gathered in order
        torch.testing.assert_close(two["reader"]["fast"][k], one["reader"]["fast"][k], rtol=1e-5, atol=1e-6)


def test_meta_articles_split_the_training_articles_between_the_stages():
    from dynlm.data.articles import Article
    from dynlm.data.errors import DataError
    from dynlm.train.setup import training_share
    arts = [Article(str(i), str(i), np.zeros(3, dtype=np.int32), 3) for i in range(10)]
    static, meta = training_share(arts, 3, "static"), training_share(arts, 3, "meta")
    assert [a.id for a in static] == [str(i) for i in range(7)] and [a.id for a in meta] == ["7", "8", "9"]
    assert training_share(arts, 0, "meta") == arts
    with pytest.raises(DataError, match="meta_articles"):
        training_share(arts, 10, "static")


def test_metatrain_never_writes_into_the_static_run(base, cache_dir, tmp_path, capsys):
    """Without --out the meta run goes beside the static run (STATIC_meta); pointed at the static run
    itself, or at an earlier meta run without --resume/--overwrite, it refuses before touching anything."""
    static_dir = tmp_path / "static"
    shutil.copytree(base.parent.parent, static_dir)
    before = (static_dir / "checkpoints" / "best.pt").read_bytes()
    args = ["metatrain", "--init", str(static_dir / "checkpoints" / "best.pt"), f"--data.cache_dir={cache_dir}",
            *[f"--{o}" for o in META], "--meta.steps=1"]
    assert main(args) == 0
    assert (tmp_path / "static_meta" / "checkpoints" / "last.pt").is_file()
    assert (static_dir / "checkpoints" / "best.pt").read_bytes() == before
    capsys.readouterr()
    assert main([*args, "--out", str(static_dir)]) == 2
    assert "holds a static run's checkpoints" in capsys.readouterr().err
    assert main(args) == 2  # the meta run exists: continue it or start it over, explicitly
    assert "pass --resume to continue it, --overwrite to start it over" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert (static_dir / "checkpoints" / "best.pt").read_bytes() == before
