"""`dynlm experiment`: every experiment's configs at both scales, the paper-scale model at its real
sizes, the runner's plan, and a tiny synthetic experiment run end to end, re-run and shared."""
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import TINY
from dynlm.cli import main
from dynlm.config import load_config, meta_steps
from dynlm.data.articles import Article
from dynlm.data.streams import StreamLayout
from dynlm.experiments.configs import experiment_configs
from dynlm.experiments.results import README_BEGIN, README_END
from dynlm.experiments.registry import BASELINES, BASES, EXPERIMENTS, EXPERIMENTS_DIR, META_FILES, SCALES, at_scale
from dynlm.experiments.registry import experiment_file
from dynlm.model import LSTMLM
from dynlm.modes import protocol_of
from dynlm.rules import adapted_names, make_rule
from dynlm.reader import start_reader
from dynlm.unroll import chunk_step

WT103_VOCAB = 267_735  # WikiText-103's word vocabulary: the embedding and softmax size at paper scale


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_config_loads_and_validates(name, scale):
    exp = EXPERIMENTS[name]
    configs = experiment_configs(exp, scale)  # loads every file, checks choices/ranges of every stage
    assert set(exp.modes) & set(BASELINES) <= set(exp.tune), "an untuned baseline is no comparison"
    for ac in configs.arms:
        cfg = ac.cfg
        assert all(f.is_file() for f in ac.files)
        if scale == "paper":
            m = cfg.model
            assert (m.n_layers, m.emb_size, m.hidden_size, m.softmax) == (3, 400, 1150, "full")
            assert (cfg.data.source, cfg.data.hub_config, cfg.run.bf16) == ("hub", "wikitext-103-v1", True)
            if exp.learner:  # long unrolls, memory kept flat by checkpointing the chunk steps
                assert cfg.meta.checkpoint and (cfg.meta.unroll >= 16 or name == "ablate-unroll")
        else:
            assert cfg.data.path.endswith("wikitext-2")
            if name.startswith("ablate-") or name == "3-level":
                # short step budgets (not minutes: a rerun reproduces them), a subset of the articles
                same_steps = ac.arm.name == "k16-same-steps"  # 4x the tokens of k4, by design
                assert cfg.meta.max_minutes == 0 and meta_steps(cfg) * cfg.meta.unroll <= 400 * (1 + 3 * same_steps)
                assert cfg.eval.max_articles > 0
        assert all(0 <= l < cfg.model.n_layers for l in cfg.rule.layers)
        assert (cfg.data.tokenizer == "sentencepiece") == name.endswith("-sp")
        if exp.learner and (name, ac.arm.name) != ("ablate-theta0", "learned"):  # one base model for all
            assert cfg.meta.theta0_lr == 0 and cfg.meta.static_lr == 0
    if name in ("baselines", "2-level", "krause"):  # every comparison table names its protocol
        protocol = {"krause": "krause"}.get(name, "article")
        assert all(protocol_of(ac.cfg.eval) == protocol for ac in configs.arms), name
        if scale == "cpu":  # tuned on 30k validation tokens the evaluation does not score
            t, e = configs.arms[0].cfg.tune, configs.arms[0].cfg.eval
            assert t.articles == 0 and t.tokens >= 30000 and t.skip_articles >= e.max_articles > 0
    if name == "3-level":
        # the EWC arms, one without it, the Fisher's two roles apart, and the oracle that knows the
        # boundaries (reset there, same streams)
        arms = {ac.arm.name: ac.cfg.meta for ac in configs.arms}
        ewc = [arms[a] for a in ("ewc", "ewc-0.01", "ewc-0.0001")]
        plain, oracle = arms["no-ewc"], arms["oracle-reset"]
        assert {m.boundary for m in (*ewc, plain)} == {"continuous"} and plain.ewc_lambda == 0
        assert oracle.boundary == configs.arms[-1].cfg.eval.boundary == "reset" and oracle.ewc_lambda == 0
        assert len({(ac.cfg.eval.batch_size, ac.cfg.eval.max_articles) for ac in configs.arms}) == 1
        assert all(m.ewc_lambda > 0 and m.consolidation == "ewc" for m in ewc)
        assert len({m.ewc_lambda for m in ewc}) == len(ewc)
        assert arms["fisher-input"].consolidation == "input" and arms["fisher-input"].ewc_lambda == 0
        assert arms["ewc-penalty"].consolidation == "penalty" and arms["ewc-penalty"].ewc_lambda == arms["ewc"].ewc_lambda
        if scale == "cpu":  # fewer streams than articles: every stream carries its weights across boundaries
            assert all(ac.cfg.eval.batch_size < ac.cfg.eval.max_articles for ac in configs.arms)
    if name == "ablate-unroll" and scale == "cpu":  # k1, k4, k16 read the same number of training tokens
        arms = {ac.arm.name: ac.cfg for ac in configs.arms}  # (one token budget, meta.max_tokens, for all)
        assert [meta_steps(arms[k]) * arms[k].meta.unroll for k in ("k1", "k4", "k16")] == [384] * 3
        # and the *-same-steps arms take as many outer steps as k4
        assert [meta_steps(arms[k]) for k in ("k4", "k1-same-steps", "k16-same-steps")] == [96] * 3
        assert (arms["k1-same-steps"].meta.unroll, arms["k16-same-steps"].meta.unroll) == (1, 16)
    if name == "ablate-layers":
        assert [ac.cfg.rule.layers for ac in configs.arms] == [[], [0], [configs.static.model.n_layers - 1]]
        assert configs.static.model.n_layers >= 2


def test_every_experiment_file_exists_and_holds_overrides_only():
    used = {f for scales in BASES.values() for files in scales.values() for f in files}
    used |= {f for files in META_FILES.values() for f in files}
    for exp in EXPERIMENTS.values():
        for scale in SCALES:
            used |= set(at_scale(exp.files, scale)) | {f for arm in exp.arms for f in at_scale(arm.files, scale)}
    on_disk = {p.name for p in EXPERIMENTS_DIR.glob("*.yaml")}
    presets = {f for f in used - on_disk if experiment_file(f).parent.name == "presets"}  # protocol_krause.yaml
    assert presets <= {"protocol_article.yaml", "protocol_krause.yaml"}
    assert used - presets <= on_disk, used - presets - on_disk
    for name in sorted(on_disk):
        load_config([EXPERIMENTS_DIR / name])  # known keys and types only; defaults come from config.py


def test_paper_scale_model_builds_at_its_real_sizes_on_the_meta_device():
    cfg = experiment_configs(EXPERIMENTS["2-level"], "paper").arms[0].cfg
    lm = LSTMLM(cfg.model, WT103_VOCAB)
    with torch.device("meta"):
        params = lm.init_params(device="meta")
    assert params["embed"].shape == (WT103_VOCAB, 400) and params["proj"].shape == (400, 1150)  # tied via proj
    assert params["lstm.0.w_ih"].shape == (4 * 1150, 400) and params["lstm.2.w_hh"].shape == (4 * 1150, 1150)
    assert 130e6 < sum(p.numel() for p in params.values()) < 140e6
    tokens = torch.zeros(2, 3, dtype=torch.long, device="meta")
    out, _ = lm.hidden(params, tokens, lm.init_state(2, device="meta"))
    assert lm.nll(params, out, tokens).shape == (2, 3)


def test_paper_scale_model_takes_a_training_step_and_a_meta_step_on_cpu():
    """Real layer sizes, a 50-word vocabulary, B=1, T=3: the loops' own pieces, in seconds."""
    cfg = experiment_configs(EXPERIMENTS["2-level"], "paper").arms[0].cfg
    cfg.rule.compile = False  # a one-off compile costs more than this whole test
    lm = LSTMLM(cfg.model, 50)
    params = {k: v.requires_grad_() for k, v in lm.init_params(seed=0).items()}
    tokens = torch.randint(1, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(params.values(), lr=cfg.train.lr)
    out, _ = lm.hidden(params, tokens[:, :3], lm.init_state(1), train=True)
    loss = lm.nll(params, out, tokens[:, 1:4]).mean()
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item()) and all(torch.isfinite(p).all() for p in params.values())

    weights = {k: v.detach() for k, v in params.items()}
    # the top layer only (10.6M weights): the un-compiled update of all three layers peaks at ~10 GB here
    cfg.rule.layers = [cfg.model.n_layers - 1]
    names = adapted_names(lm, cfg.rule, "learned", weights)
    theta0 = {k: weights[k] for k in names}
    rule = make_rule("learned", cfg.rule, names)
    reader = start_reader(lm, theta0, rule, names, 1, "cpu")
    layout = StreamLayout([Article("a", "a", tokens[0].numpy().astype(np.int32), 7)], 1, 3, eos_id=0)
    meta_loss = 0.0
    for c in range(2):  # K=2: the learner's first update only shows in the second chunk's loss
        nll, reader, _ = chunk_step(lm, weights, theta0, rule, reader, layout.chunk(c), meta=True,
                                    second_order=cfg.meta.second_order, checkpoint=cfg.meta.checkpoint)
        meta_loss = meta_loss + nll.sum()
    meta_loss.backward()
    grads = [p.grad for p in rule.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def tiny_experiment_args(tmp_path) -> list[str]:
    """The CPU-scale experiment files over the synthetic corpus, at the test suite's tiny sizes."""
    return ["--runs", str(tmp_path / "runs"), "--results-file", str(tmp_path / "RESULTS.md"),
            "--readme", str(tmp_path / "README.md"), "--data.source=synthetic",
            *[f"--{o}" for o in TINY], f"--data.cache_dir={tmp_path / 'cache'}", "--data.meta_articles=3",
            "--meta.steps=2", "--meta.max_minutes=0", "--meta.unroll=2", "--meta.batch_size=2",
            "--meta.log_every=1", "--meta.checkpoint_every=1", "--meta.valid_articles=2", "--rule.compile=false", "--rule.grad_rms_chunks=3",
            "--data.synthetic.n_valid=4", "--eval.max_articles=2",  # tuned on the other 2, as the suite does
            "--tune.skip_articles=2", "--tune.articles=2", "--tune.sgd_lr=[0.005,0.01]", "--tune.dyneval_lr=[5e-5,1e-4]",
            "--tune.dyneval_lamb=[2e-3]", "--tune.cache_theta=[0.3]", "--tune.cache_lambda=[0.01,0.02]",
            "--tune.adam_lr=[1e-3]", "--tune.adam_decay=[1e-3]", "--tune.max_extensions=1"]


def test_dry_run_lists_the_stages_and_runs_nothing(tmp_path, capsys):
    args = tiny_experiment_args(tmp_path)
    assert main(["experiment", "2-level", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert re.search(r"1\. prepare.*2\. train.*3\. metatrain.*4\. tune.*5\. evaluate.*6\. report", out, re.S)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "RESULTS.md").exists()
    assert main(["experiment", "3-level", "--scale", "paper", "--dry-run", "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "metatrain arm ewc" in out and "metatrain arm no-ewc" in out and "WikiText-103" in out


def test_unknown_experiment_or_bad_override_is_a_clear_error(tmp_path, capsys):
    assert main(["experiment", "4-level", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment '4-level'" in err and "1-level, baselines, 2-level" in err
    assert main(["experiment", "2-level", "--dry-run", "--runs", str(tmp_path), "--meta.nope=1"]) == 2
    assert "meta.nope" in capsys.readouterr().err


def test_tiny_experiment_end_to_end_then_skipped_reproduced_and_shared(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\nold\n{README_END}\n\nafter\n")
    args = tiny_experiment_args(tmp_path)
    assert main(["experiment", "2-level", *args]) == 0
    capsys.readouterr()
    eval_dir = tmp_path / "runs" / "experiments" / "cpu" / "2-level" / "main" / "eval_valid"
    first = json.loads((eval_dir / "summary.json").read_text())["modes"]
    assert set(first) == {"static", *BASELINES, "learned", "learned+cache"}
    results = (tmp_path / "RESULTS.md").read_text()
    row = next(l for l in results.splitlines() if l.startswith("| 2-level | main |"))
    assert f"{first['learned']['ppl']:.2f}" in row and f"{first['dyneval']['ppl']:.2f}" in row
    assert "dynlm experiment 2-level --scale cpu" in results and "**Headline** (`custom (3 streams, segment 10" in results
    assert re.search(r"learned [0-9.]+ vs dyneval@lstm [0-9.]+: learned (wins|loses) by [0-9.]+ ppl", results)
    assert re.search(r"\| learned\+cache \| [0-9.]+ \(", results)  # the comparison table, article column
    assert "Protocol: `custom (3 streams, segment 10, reset at article boundaries)`." in results  # TINY's reading
    assert re.search(r"tuned on valid articles 3-4 \([0-9,]+ tokens\), apart from the evaluated ones", results)
    assert "| 2-level | main |" in readme.read_text() and "after" in readme.read_text()
    assert "old" not in readme.read_text() and "65.8" in readme.read_text()  # published numbers, labelled

    # again: every stage is found done, nothing is recomputed, the table is the same
    assert main(["experiment", "2-level", *args]) == 0
    out = capsys.readouterr().out
    for stage in ("prepare", "train", "metatrain", "tune", "evaluate"):
        assert f"[2-level] {stage}: skipped" in out
    assert (tmp_path / "RESULTS.md").read_text() == results

    # an evaluation redone from the same checkpoint reproduces its numbers
    assert main(["experiment", "2-level", "--redo", "evaluate", *args]) == 0
    out = capsys.readouterr().out
    assert "[2-level] metatrain: skipped" in out and "reproduced the previous perplexities exactly" in out
    again = json.loads((eval_dir / "summary.json").read_text())["modes"]
    assert {m: v["ppl"] for m, v in again.items()} == {m: v["ppl"] for m, v in first.items()}

    # an interrupted meta-training (only its step-1 checkpoint left) is resumed, to the same weights
    meta_ckpts = next((tmp_path / "runs" / "experiments" / "cpu" / "meta").glob("*/checkpoints"))
    for name in ("ckpt_step00000002.pt", "last.pt", "best.pt"):
        (meta_ckpts / name).unlink()
    assert main(["experiment", "2-level", *args]) == 0
    out = capsys.readouterr().out
    assert f"resume {meta_ckpts.parent} (step 1" in out and "[2-level] evaluate: skipped" in out

    # another experiment on the same base shares its checkpoint and tuning (and so its baseline numbers)
    # and, reading the same base weights on the same articles, takes its modes out of 2-level's evaluation
    assert main(["experiment", "baselines", *args]) == 0
    out = capsys.readouterr().out
    assert "[baselines] train: skipped, reusing" in out and "[baselines] tune: skipped" in out
    assert f"take {', '.join(('static', *BASELINES))} out of {eval_dir}" in out
    taken = eval_dir.parents[2] / "baselines" / "main" / "eval_valid"
    shared = json.loads((taken / "summary.json").read_text())
    current = json.loads((eval_dir / "summary.json").read_text())["modes"]  # (timings as redone above)
    assert shared["modes"] == {m: current[m] for m in ("static", *BASELINES)}
    assert {r["mode"] for r in csv.DictReader(open(taken / "per_article.csv"))} == {"static", *BASELINES}
    table = pq.read_table(taken / "tokens.parquet")
    assert "nll_learned" not in table.column_names and "nll_dyneval" in table.column_names
    assert table.num_rows == pq.read_table(eval_dir / "tokens.parquet").num_rows
    assert (taken / "improvement.png").is_file() and (taken / "runner.json").is_file()
    assert main(["experiment", "baselines", *args]) == 0  # done in place now
    assert "[baselines] evaluate: skipped, done" in capsys.readouterr().out

    # the tables are a function of the run directories alone
    (tmp_path / "RESULTS.md").unlink()
    assert main(["experiment", "--results", *args[:6]]) == 0
    regenerated = (tmp_path / "RESULTS.md").read_text()
    assert "| baselines | main |" in regenerated and row in regenerated


def test_ablations_share_the_evaluation_of_their_common_arm(tmp_path, capsys):
    (tmp_path / "README.md").write_text("# x\n")
    args = tiny_experiment_args(tmp_path)
    assert main(["experiment", "ablate-learner", *args]) == 0
    capsys.readouterr()
    root = tmp_path / "runs" / "experiments" / "cpu"
    ff = root / "ablate-learner" / "ff" / "eval_valid"
    # ablate-order's first-order arm is ablate-learner's ff arm: same meta-run, same evaluation key
    assert main(["experiment", "ablate-order", "--dry-run", *args]) == 0
    assert f"copy {ff} (same weights, modes and settings)" in capsys.readouterr().out
    assert main(["experiment", "ablate-order", *args]) == 0
    out = capsys.readouterr().out
    assert "[ablate-order] metatrain: skipped, reusing" in out
    copied = root / "ablate-order" / "first-order" / "eval_valid"
    assert json.loads((copied / "summary.json").read_text()) == json.loads((ff / "summary.json").read_text())
    assert json.loads((copied / "runner.json").read_text())["command"].startswith("dynlm experiment ablate-learner")
    # the second-order arm is new: evaluated, not copied
    assert (root / "ablate-order" / "second-order" / "eval_valid" / "summary.json").is_file()
    assert main(["experiment", "ablate-order", *args]) == 0  # now done in place: skipped
    assert "[ablate-order] evaluate: skipped, done" in capsys.readouterr().out


def test_results_say_how_many_streams_a_continuous_evaluation_read():
    """Continuous numbers depend on how many article boundaries each stream crosses: the section says
    how many streams read the articles (never more than there are articles); reset numbers do not."""
    from dynlm.experiments.results import experiment_section
    summary = {"modes": {m: {"ppl": p, "n_tokens": 900, "n_articles": 3, "rel_change_vs_static": p / 100 - 1}
                         for m, p in (("static", 100.0), ("learned", 90.0))}}
    arm = {"summary": summary, "record": {"commit": "abc", "finished": "now", "command": "dynlm experiment x"},
           "eval_max_articles": 3, "eval_boundary": "continuous"}
    record = {"experiment": "x", "title": "t", "command": "dynlm experiment x",
              "base": {"run_dir": "runs/b", "files": ["b.yaml"]},
              "arms": [{**arm, "name": "two", "eval_streams": 2}, {**arm, "name": "many", "eval_streams": 16},
                       {**arm, "name": "reset", "eval_streams": 2, "eval_boundary": "reset"}]}
    lines = {l.split(":")[0]: l for l in experiment_section(record).splitlines() if l.startswith("- ")}
    assert "read continuously as 2 streams" in lines["- two"]
    assert "read continuously as 3 streams" in lines["- many"]  # 3 articles: one per stream
    assert "stream" not in lines["- reset"]


def test_a_redone_evaluation_says_how_far_it_moved_and_why_it_may_have():
    from dynlm.experiments.results import compare_summaries
    before = {"modes": {"static": {"ppl": 112.9231}, "learned": {"ppl": 97.3146}}}
    assert compare_summaries(before, before, (1, 1)).startswith("reproduced the previous perplexities exactly")
    moved = {"modes": {"static": {"ppl": 112.9231}, "learned": {"ppl": 97.3146 * (1 + 3e-9)}}}
    text = compare_summaries(before, moved, (1, 2))
    assert text.startswith("differs") and "learned 97.3146 -> 97.3146 (relative +3.0e-09)" in text
    assert "static 112.9231 -> 112.9231;" in text  # an unchanged mode shows no relative change
    assert "recorded with 1 torch thread(s), redone with 2" in text
    assert "thread" not in compare_summaries(before, moved, (None, 2))  # older records did not say


def test_an_experiment_can_run_a_subset_of_its_modes_and_says_so(tmp_path, capsys):
    args = tiny_experiment_args(tmp_path)
    assert main(["experiment", "krause", "--modes", "dyneval,cache", *args]) == 0
    summary = json.loads((tmp_path / "runs" / "experiments" / "cpu" / "krause" / "main" / "eval_valid"
                          / "summary.json").read_text())
    assert set(summary["modes"]) == {"static", "dyneval", "cache"} and set(summary["tuned"]["modes"]) == {
        "dyneval", "cache"}
    results = (tmp_path / "RESULTS.md").read_text()
    assert ("Not run in this record (`--modes`): learned, dyneval@lstm, learned+cache, dyneval+cache, adam, sgd, "
            "adam+cache, sgd+cache.") in results  # krause has the learned modes too (e143bfa)
    assert "dynlm experiment krause --scale cpu --modes dyneval,cache" in results
    assert main(["experiment", "krause", "--modes", "adam@all", *args]) == 2
    assert "not modes of experiment 'krause'" in capsys.readouterr().err

    # a later run of other modes scores only those and keeps the columns already there, as they were
    eval_dir = tmp_path / "runs" / "experiments" / "cpu" / "krause" / "main" / "eval_valid"
    before = pq.read_table(eval_dir / "tokens.parquet")
    assert main(["experiment", "krause", "--modes", "sgd", "--dry-run", *args]) == 0
    assert "evaluate sgd of" in capsys.readouterr().out  # the plan: only the new mode is scored
    assert main(["experiment", "krause", "--modes", "sgd", *args]) == 0
    after = pq.read_table(eval_dir / "tokens.parquet")
    for mode in ("static", "dyneval", "cache"):
        assert after.column(f"nll_{mode}").equals(before.column(f"nll_{mode}")), mode
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert list(summary["modes"]) == ["static", "dyneval", "cache", "sgd"]  # the experiment's order
    assert summary["scored_by"]["sgd"] == "this evaluation" and "finished" in summary["scored_by"]["dyneval"]
    record = json.loads((eval_dir / "runner.json").read_text())
    assert "--modes dyneval,cache " in record["scored_by"]["dyneval"]["command"]
    assert "--modes sgd " in record["scored_by"]["sgd"]["command"]
    results = (tmp_path / "RESULTS.md").read_text()
    assert "static, dyneval, cache kept from the evaluation at commit" in results
    assert "Not run in this record (`--modes`): learned, dyneval@lstm, learned+cache," in results  # sgd is in
    assert main(["experiment", "krause", "--modes", "dyneval,sgd", "--dry-run", *args]) == 0
    assert "done:" in capsys.readouterr().out.split("evaluate ")[-1]  # nothing left to score


def test_a_subset_of_modes_keeps_the_experiments_protocol_and_tunes_parents_first(tmp_path):
    from dynlm.experiments.command import only_modes
    for modes in (["dyneval"], ["learned+cache"], ["cache", "adam"]):
        cfg = experiment_configs(only_modes(EXPERIMENTS["2-level"], modes), "cpu").arms[0].cfg
        assert protocol_of(cfg.eval) == "article", modes  # not the static base's own segment length
    assert only_modes(EXPERIMENTS["2-level"], ["learned+cache"]).learner  # it reads the meta-trained learner
    # a combination given before its parents is still tuned after them, from their tuned values
    args = tiny_experiment_args(tmp_path)
    assert main(["experiment", "krause", "--modes", "dyneval+cache,dyneval,cache", *args]) == 0
    tuned = next((tmp_path / "runs").rglob("tuned_*continuous.yaml"))
    modes = yaml.safe_load(tuned.read_text())["modes"]
    assert {k: modes["dyneval+cache"][k] for k in ("dyneval_lr", "dyneval_lamb")} == modes["dyneval"]
    assert modes["dyneval+cache"]["cache_theta"] == modes["cache"]["cache_theta"]


def test_experiment_rewrites_the_repositorys_files_only_from_its_root_or_when_asked(tmp_path, monkeypatch, capsys):
    """Issue 17: run from another directory with --runs, the plan rewrote the installed repository's
    README.md and experiments/RESULTS.md."""
    from dynlm.experiments.command import generated_files
    from dynlm.experiments.registry import README_FILE, REPO, RESULTS_FILE
    monkeypatch.chdir(tmp_path)
    assert generated_files(Path("runs"), None, None) == (None, None)
    note = capsys.readouterr().out
    assert "not rewriting" in note and "--results-file" in note
    assert generated_files(Path("runs"), str(tmp_path / "R.md"), "") == (tmp_path / "R.md", None)  # asked
    monkeypatch.chdir(REPO)
    assert generated_files(Path("runs"), None, None) == (RESULTS_FILE, README_FILE)
    assert generated_files(tmp_path / "runs", None, None) == (None, None)  # runs outside the repository
    assert generated_files(Path("runs"), "", "") == (None, None)
    monkeypatch.chdir(tmp_path)
    before = RESULTS_FILE.read_bytes(), README_FILE.read_bytes()
    assert main(["experiment", "--results", "--runs", str(tmp_path / "runs")]) == 0
    assert (RESULTS_FILE.read_bytes(), README_FILE.read_bytes()) == before


def test_missing_wikitext_is_said_by_the_dry_run_and_stops_the_real_run(tmp_path, monkeypatch, capsys):
    """Issue 17: the CPU scale's ../shared/data/wikitext-2 is relative to the current directory; the dry
    run did not notice it missing and the real run failed without naming the ways out."""
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "1-level", "--dry-run", "--runs", "runs"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: the WikiText data is not at data.path=../shared/data/wikitext-2" in out
    assert "--data-dir DIR" in out and "--data.source=hub" in out and "next: dynlm experiment 1-level" in out
    assert main(["experiment", "1-level", "--runs", "runs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynlm experiment: error: 1-level: the WikiText data is not at") and err.count("\n") == 1
    assert "--data-dir" in err and "--data.source=hub" in err
    assert not (tmp_path / "runs" / "experiments" / "cpu" / "static").exists()  # nothing started


def test_one_protocol_column_merges_experiments_that_scored_the_same_text():
    """2-level-all's learned@all joins 2-level's column (same static model, same articles) and the
    headline compares each learned rule with dyneval of the same weights; an experiment on other text
    (another static perplexity) is left out of the column rather than mixed in."""
    from dynlm.experiments.results import comparison_table, goal_note

    def record(name, modes, static=100.0, n_tokens=900):
        ms = {m: {"ppl": p, "n_tokens": n_tokens, "n_articles": 3, "rel_change_vs_static": p / static - 1}
              for m, p in {"static": static, **modes}.items()}
        return {"scale": "cpu", "experiment": name, "arms": [{"summary": {"modes": ms, "protocol": "article"}}]}
    two = record("2-level", {"learned": 90.0, "dyneval": 70.0, "dyneval@lstm": 91.0, "dyneval+cache": 60.0})
    table = comparison_table([two, record("2-level-all", {"learned@all": 75.0, "learned@all+cache": 58.0})], "cpu")
    rows = {l.split(" | ")[0]: l for l in table.splitlines()}
    assert "75.00 (-25.0%)" in rows["| learned@all"] and "58.00 (-42.0%)" in rows["| learned@all+cache"]
    note = goal_note([two, record("2-level-all", {"learned@all": 75.0, "learned@all+cache": 58.0})], "cpu")
    assert "learned@all 75.00 vs dyneval 70.00: learned@all loses by 5.00 ppl" in note
    assert "learned@all+cache 58.00 vs dyneval+cache 60.00: learned@all+cache wins by 2.00 ppl" in note
    assert "Best of the modes run: learned@all+cache" in note
    other = comparison_table([two, record("2-level-all", {"learned@all": 75.0}, static=101.0)], "cpu")
    assert "learned@all" not in other
    # the krause protocol gets the same like-for-like sentence, from its own evaluation
    krause = record("krause", {"learned": 95.0, "dyneval": 80.0, "dyneval@lstm": 97.0, "adam": 96.0})
    krause["arms"][0]["summary"]["protocol"] = "krause"
    note = goal_note([two, krause], "cpu")
    said = note[note.index("Under the `krause` protocol"):]
    assert "learned 95.00 vs dyneval@lstm 97.00: learned wins by 2.00 ppl" in said
    assert "learned 95.00 vs adam 96.00: learned wins by 1.00 ppl" in said
    assert "learned 95.00 vs dyneval 80.00: learned loses by 15.00 ppl" in said
    assert "Best of the modes run there: dyneval (80.00, -20.0% vs static)" in said


def test_a_run_older_than_a_setting_ran_with_its_default():
    """A saved config without a newer setting (meta.consolidation) matches the setting's default, which
    keeps the old behaviour, and nothing else: a new arm that sets it is not handed the old run."""
    from dynlm.experiments.configs import _mismatches, meta_key
    from dynlm.config import Config, to_dict
    wanted = to_dict(Config())
    saved = to_dict(Config())
    del saved["meta"]["consolidation"]
    assert _mismatches(meta_key(saved), meta_key(wanted)) == []
    wanted["meta"]["consolidation"] = "input"
    assert _mismatches(meta_key(saved), meta_key(wanted)) == [
        "meta.consolidation: 'ewc' vs 'input' (a setting the run predates)"]
