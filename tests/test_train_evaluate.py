"""End to end on a tiny synthetic corpus: train, resume, evaluate, demo, and clear errors."""
import csv
import json
import math
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from dynlm.checkpoint import load_checkpoint
from dynlm.cli import main
from dynlm.data.tokenizers import WordTokenizer


def train(run, overrides, *extra):
    assert main(["train", "--out", str(run), *[f"--{o}" for o in overrides], *extra]) == 0


@pytest.fixture
def trained(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    train(run, tiny_overrides)
    return run


def test_train_writes_config_metrics_and_checkpoints(trained):
    assert (trained / "config.yaml").exists()
    lines = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in l for l in lines) and any("valid/ppl" in l for l in lines)
    ck = load_checkpoint(trained / "checkpoints" / "best.pt")
    assert ck["config"]["model"]["hidden_size"] == 24 and ck["step"] in (10, 20)
    # training reduced the loss from its start
    losses = [l["train/loss"] for l in lines if "train/loss" in l]
    assert losses[-1] < losses[0]


def test_resume_continues_bit_exactly(tmp_path, tiny_overrides, trained):
    run = tmp_path / "resumed"
    train(run, tiny_overrides)
    ckpts = run / "checkpoints"
    # pretend the run died right after step 10: only its checkpoint is left
    shutil.copy(ckpts / "ckpt_step00000010.pt", ckpts / "last.pt")
    (ckpts / "ckpt_step00000020.pt").unlink()
    train(run, tiny_overrides, "--resume")
    a = load_checkpoint(trained / "checkpoints" / "last.pt")["params"]
    b = load_checkpoint(ckpts / "last.pt")["params"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def evaluate(trained, out, *extra):
    return main(["evaluate", "--checkpoint", str(trained / "checkpoints" / "best.pt"), "--split", "valid",
                 "--out", str(out), *extra])


def test_evaluate_outputs(trained, tmp_path, tiny_overrides):
    out = tmp_path / "eval"
    assert evaluate(trained, out, f"--data.cache_dir={tmp_path / 'cache'}") == 0
    rows = list(csv.DictReader(open(out / "per_article.csv")))
    assert {"mode", "article_id", "title", "n_tokens", "nll_sum", "ppl"} <= set(rows[0])
    assert len(rows) == 3 and {r["mode"] for r in rows} == {"static"}
    summary = json.loads((out / "summary.json").read_text())["modes"]["static"]
    n = sum(int(r["n_tokens"]) for r in rows)
    assert summary["n_tokens"] == n and summary["n_articles"] == 3
    assert math.isclose(summary["ppl"], math.exp(sum(float(r["nll_sum"]) for r in rows) / n), rel_tol=1e-9)
    tokens = pq.read_table(out / "tokens.parquet").to_pandas()
    assert len(tokens) == n and tokens.groupby("article_id").position.nunique().sum() == n


def test_relative_drift_on_a_hand_made_case():
    from dynlm.prequential import relative_drift
    theta0 = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # ||theta0|| = 5
    fast = {"a": torch.tensor([[3.0, 0.0], [3.0, 3.0]]), "b": torch.tensor([[4.0], [8.0]])}  # stream 1 moved by (0, 3, 4)
    torch.testing.assert_close(relative_drift(fast, theta0), torch.tensor([0.0, 1.0]))


def test_batched_streams_give_the_same_numbers(trained, tmp_path):
    ppl = []
    for b in (1, 3):
        out = tmp_path / f"eval{b}"
        assert evaluate(trained, out, f"--eval.batch_size={b}", f"--data.cache_dir={tmp_path / 'cache'}") == 0
        ppl.append(json.loads((out / "summary.json").read_text())["modes"]["static"]["ppl"])
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)


def test_continuous_reading_warns_when_no_stream_crosses_a_boundary(trained, tmp_path, capsys):
    """3 articles over 3 streams read 'continuously' are reset reading in disguise: say so. Over one
    stream the hidden state really is carried from article to article, and the numbers change."""
    ppl = {}
    for b in (3, 1):
        out = tmp_path / f"cont{b}"
        assert evaluate(trained, out, "--eval.boundary=continuous", f"--eval.batch_size={b}",
                        f"--data.cache_dir={tmp_path / 'cache'}") == 0
        err = capsys.readouterr().err
        assert ("no stream reads across an article boundary" in err) == (b == 3)
        ppl[b] = json.loads((out / "summary.json").read_text())["modes"]["static"]["ppl"]
    assert ppl[1] != pytest.approx(ppl[3], rel=1e-6)


def test_evaluate_bad_input_is_a_clear_error(trained, tmp_path, capsys):
    assert evaluate(trained, tmp_path / "e1", "--modes", "static,bogus") == 2
    assert "unknown mode" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(trained / "checkpoints" / "best.pt"), "--split", "nosuch",
                 "--out", str(tmp_path / "e2")]) == 2
    assert "split" in capsys.readouterr().err
    shutil.rmtree(trained / "tokenizer")
    WordTokenizer(["<eos>", "<unk>", "a", "b"]).save(trained / "tokenizer")  # another run's vocabulary
    assert evaluate(trained, tmp_path / "e3") == 2
    assert "vocabulary mismatch" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_demo_writes_per_article_results(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "demo"
    small = ["data.meta_articles=3", "meta.steps=3", "meta.batch_size=2", "meta.valid_articles=1",
             "tune.articles=1", "eval.segment_length=10"]
    assert main(["demo", "--out", str(out), *[f"--{o}" for o in tiny_overrides + small]]) == 0
    summary = json.loads((out / "eval_test" / "summary.json").read_text())
    # the whole pipeline: static LM, meta-trained learner, tuned baselines, every mode, the report
    assert set(summary["modes"]) == {"static", "sgd", "dyneval", "adam", "cache", "learned", "learned+cache"}
    assert set(summary["tuned"]["modes"]) == {"sgd", "dyneval", "adam", "cache", "learned+cache"}
    assert all(summary["settings"][m]["cache_lambda"]["source"] == "tuned" for m in ("cache", "learned+cache"))
    assert (out / "meta" / "tuned_seg10-3streams-reset.yaml").exists() and (out / "meta" / "checkpoints" / "last.pt").exists()
    for name in ("per_article.csv", "tokens.parquet", "heatmap.html", "improvement.png", "drift.png"):
        assert (out / "eval_test" / name).exists(), name
    assert "\nnext: dynlm experiment 2-level --dry-run" in capsys.readouterr().out  # what to do after the demo


def test_metatrain_then_evaluate_every_rule(trained, tmp_path, capsys):
    meta = tmp_path / "meta"
    assert main(["metatrain", "--init", str(trained / "checkpoints" / "best.pt"), "--out", str(meta),
                 "--meta.steps=2", "--meta.unroll=2", "--eval.segment_length=5", "--meta.batch_size=2",
                 "--meta.log_every=1"]) == 0
    assert f"next: dynlm tune --checkpoint {meta / 'checkpoints' / 'best.pt'} --skip-articles 20" in capsys.readouterr().out
    lines = [json.loads(l) for l in (meta / "metrics.jsonl").read_text().splitlines()]
    assert {"meta/loss", "meta/static_loss", "meta/gain", "meta/forget_gate"} <= set(lines[-2])
    assert {"meta/valid_ppl_static", "meta/valid_ppl_learned"} <= set(lines[-1])  # validated at the end
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(meta / "checkpoints" / "last.pt"), "--split", "valid",
                 "--modes", "static,sgd,dyneval,learned", "--out", str(out), "--rule.grad_rms_chunks=3"]) == 0
    assert f"next: open {out / 'stream.png'} {out / 'heatmap.html'}" in capsys.readouterr().out
    modes = json.loads((out / "summary.json").read_text())["modes"]
    assert set(modes) == {"static", "sgd", "dyneval", "learned"}
    assert all(m["n_tokens"] == modes["static"]["n_tokens"] and math.isfinite(m["ppl"]) for m in modes.values())
    # the adaptive modes report how far their weights wandered from theta0, and the report plots it
    assert "weight_drift" not in modes["static"]
    for mode in ("sgd", "dyneval", "learned"):
        d = modes[mode]["weight_drift"]
        assert 0 < d["final_mean"] <= d["max"] < 1, (mode, d)
    drift_rows = list(csv.DictReader(open(out / "drift.csv")))
    assert {r["mode"] for r in drift_rows} == {"sgd", "dyneval", "learned"} and (out / "drift.png").stat().st_size > 1000


def test_dyneval_on_all_weights_through_evaluate(trained, tmp_path):
    """Krause's full dynamic evaluation (embeddings and softmax too: the default) and its LSTM-only
    control (`dyneval@lstm`) run side by side from the command line and score the same tokens."""
    ckpt = trained / "checkpoints" / "best.pt"
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--split", "valid", "--modes", "static,dyneval,dyneval@lstm",
                 "--out", str(out), "--rule.grad_rms_chunks=3", "--rule.dyneval_lr=3e-4", "--ignore-tuned"]) == 0
    modes = json.loads((out / "summary.json").read_text())["modes"]
    every, lstm = modes["dyneval"], modes["dyneval@lstm"]
    assert every["n_tokens"] == lstm["n_tokens"] == modes["static"]["n_tokens"]
    assert math.isfinite(every["ppl"]) and every["ppl"] != pytest.approx(lstm["ppl"], rel=1e-6)


def strict_json(text: str):
    """RFC 8259 JSON only: NaN, Infinity and -Infinity are not JSON, whatever Python's json module accepts."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_summary_json_is_strict_json_and_a_diverged_mode_is_null(tmp_path):
    """Issue 16, kind 7: a mode whose loss blew up (inf, nan) is recorded as null, never as bare Infinity."""
    import numpy as np

    from dynlm.data.articles import Article
    from dynlm.prequential import TokenScores, write_results

    arts = [Article("valid/0", "Café", np.array([2, 3, 1], dtype=np.int32), 3)]
    idx = dict(article=np.zeros(3, np.int64), position=np.arange(3), token=np.array([2, 3, 1]))
    results = {"static": TokenScores(**idx, nll=np.array([1.0, 2.0, 0.5]), seconds=1.0),
               "sgd": TokenScores(**idx, nll=np.array([1.0, np.inf, 0.5]), seconds=1.0),
               "dyneval": TokenScores(**idx, nll=np.array([1.0, np.nan, 0.5]), seconds=0.0)}
    write_results(tmp_path, results, arts, per_word=False, extra={"note": float("inf")})
    summary = strict_json((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["modes"]["static"]["ppl"] > 1 and summary["note"] is None
    assert summary["modes"]["sgd"]["ppl"] is None and summary["modes"]["sgd"]["rel_change_vs_static"] is None
    assert summary["modes"]["dyneval"]["ppl"] is None and summary["modes"]["dyneval"]["tokens_per_s"] is None
    rows = list(csv.DictReader(open(tmp_path / "per_article.csv", encoding="utf-8")))
    assert {r["title"] for r in rows} == {"Café"}


def test_score_own_text_with_a_trained_checkpoint(trained, tmp_path, capsys):
    """Issue 17, 'score my own text': only the scored split's folder is needed (dyneval's MS comes from
    the model's own training text), titles are file names, and the <unk> share is said and recorded."""
    vocab = (trained / "tokenizer" / "vocab.txt").read_text().split("\n")[:-1]
    known = [w for w in vocab if not w.startswith("<")][:30]
    mine = tmp_path / "mytexts" / "test"
    mine.mkdir(parents=True)
    lines = [" ".join(known[i:i + 10] + ["zzz-unknown", "qqq,", "zzz-third"]) for i in (0, 10, 20)]  # 10 known, 3 not
    (mine / "my_essay.txt").write_text("\n".join(lines) + "\n")
    (mine / "notes.txt").write_text(" ".join(known) + "\n")
    out = tmp_path / "mine_eval"
    assert main(["evaluate", "--checkpoint", str(trained / "checkpoints" / "best.pt"), "--data.source=text",
                 f"--data.path={mine.parent}", "--split", "test", "--modes", "static,dyneval", "--out", str(out),
                 "--rule.grad_rms_chunks=3"]) == 0
    captured = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    n_tokens = 3 * 14 + 31  # words + one <eos> per line
    assert summary["n_unk"] == 9 and summary["unk_rate"] == pytest.approx(9 / n_tokens)
    assert f"unknown tokens: {100 * 9 / n_tokens:.1f}% of the scored tokens (9) are <unk>" in captured.out
    assert "are <unk>: their perplexity is not comparable" in captured.err  # 12%: also a warning
    assert "separate punctuation from words" in captured.err
    assert {r["title"] for r in csv.DictReader(open(out / "per_article.csv"))} == {"my_essay", "notes"}
    assert summary["modes"]["dyneval"]["n_tokens"] == n_tokens  # without mytexts/train


def test_evaluate_keeps_an_earlier_evaluation_unless_asked(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate(trained, out) == 0
    before = (out / "summary.json").read_text()
    capsys.readouterr()
    assert evaluate(trained, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynlm evaluate: error: ") and "--overwrite" in err and err.count("\n") == 1
    assert (out / "summary.json").read_text() == before
    assert evaluate(trained, out, "--overwrite") == 0


def test_a_short_run_warns_of_its_long_warmup_and_logs_its_last_loss(tmp_path, tiny_overrides, capsys):
    """Issue 17: warmup_steps > max_steps kept the model near uniform without a word, and log_every >
    max_steps hid the training loss; with stdout and stderr in one log file no bar control characters."""
    run = tmp_path / "short"
    train(run, tiny_overrides, "--train.max_steps=3", "--train.warmup_steps=10", "--train.log_every=50")
    captured = capsys.readouterr()
    assert "warning: train.warmup_steps=10 is more than the run's 3 steps (train.max_steps=3)" in captured.err
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "train/loss" in l] == [3]  # logged at the last step
    assert "[step 3] train/lr=" in captured.out and "last train loss" in captured.out  # no bar: plain lines
    assert "\r" not in captured.out + captured.err and "\x1b[" not in captured.out + captured.err
    assert f"next: dynlm metatrain --init {run / 'checkpoints' / 'best.pt'}" in captured.out
