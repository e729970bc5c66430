import json
import math
from pathlib import Path

import pytest
import torch

from dynlm.bench.reference import TorchLSTMLM
from dynlm.cli import main
from dynlm.config import ModelConfig
from dynlm.model import LSTMLM

REQUIRED_RATIOS = ("dyneval_vs_static_train", "learned_vs_dyneval", "learned_vs_dyneval_short",
                   "learned_all_vs_dyneval_all", "metatrain_first_order_vs_static_train",
                   "memory_k64_vs_k4_checkpointed", "memory_k64_vs_k4_plain", "functional_vs_nn_lstm_train")

# big enough that one meta-step's memory shows in the RSS (a few MiB per chunk step), small enough for seconds
TINY_BENCH = ["--model.emb_size=32", "--model.hidden_size=64", "--bench.vocab_size=100", "--bench.batch_size=2",
              "--eval.segment_length=6", "--bench.short_segment=3", "--bench.repeats=1", "--bench.warmup=1",
              "--bench.steps=1", "--bench.learner_hidden=4", "--bench.memory_batch_size=2", "--bench.threads=1",
              "--meta.unroll=2"]


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_functional_model_equals_nn_lstm_model(softmax):
    """Same weights, same tokens: the functional LSTMLM and the nn.Embedding + nn.LSTM build give the
    same loss and the same gradients (nn.LSTM's second bias gets the same gradient as the first)."""
    cfg = ModelConfig(emb_size=8, hidden_size=16, n_layers=2, softmax=softmax, adaptive_cutoffs=[10, 30])
    lm = LSTMLM(cfg, 50)
    params = {k: v.requires_grad_() for k, v in lm.init_params(seed=1, dtype=torch.float64).items()}
    module = TorchLSTMLM(lm, params)
    tokens, targets = torch.randint(0, 50, (3, 7)), torch.randint(0, 50, (3, 7))
    state = lm.init_state(3, dtype=torch.float64)

    out, _ = lm.hidden(params, tokens, state)
    loss = lm.nll(params, out, targets).mean()
    loss.backward()
    ref_out, _ = module.hidden(tokens, state)
    ref_loss = module.nll(ref_out, targets).mean()
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(params["embed"].grad, module.embed.weight.grad)
    for l, layer in enumerate(module.layers):
        torch.testing.assert_close(params[f"lstm.{l}.w_ih"].grad, layer.weight_ih_l0.grad)
        torch.testing.assert_close(params[f"lstm.{l}.w_hh"].grad, layer.weight_hh_l0.grad)
        torch.testing.assert_close(params[f"lstm.{l}.b"].grad, layer.bias_ih_l0.grad)
        torch.testing.assert_close(params[f"lstm.{l}.b"].grad, layer.bias_hh_l0.grad)
    softmax_grads = {k: p.grad for k, p in module.softmax_params().items() if k != "embed"}
    assert softmax_grads  # tied output bias (full) or the adaptive softmax's weights
    for k, g in softmax_grads.items():
        torch.testing.assert_close(params[k].grad, g)


@pytest.mark.slow
def test_bench_writes_every_ratio_and_memory_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--out", str(out), "--device", "cpu", *TINY_BENCH, "--bench.profile=[learned_ff_seg6]",
                 "--bench.profile_calls=1"]) == 0
    result = json.loads(out.read_text())
    # where the learned row's time goes: torch.profiler's operators, by self time
    profile = Path(result["profiles"]["learned_ff_seg6"]).read_text()
    assert profile.startswith("# online learned ff") and "Self CPU" in profile and "aten::" in profile
    for key in REQUIRED_RATIOS:
        assert key in result["ratios"], key
        assert math.isfinite(result["ratios"][key]) and result["ratios"][key] > 0, (key, result["ratios"][key])
    rows = result["memory"]["rows"]
    for k in (1, 4, 16, 64):
        for ckpt in (False, True):
            (row,) = [r for r in rows if r["unroll"] == k and r["checkpoint"] == ckpt]
            assert row["peak_mib"] is not None and row["peak_mib"] >= 0, row
    assert {"static_train", "nn_lstm_train", "dyneval_seg6", "dyneval_seg3", "learned_ff_seg6", "learned_rnn_seg3",
            "learned_ff_hidden4_seg6", "metatrain_first_order_checkpointed", "dyneval_all_seg3", "adam_seg6",
            "learned_ff_cache_seg6", "dyneval_all_1stream_seg3"} <= set(result["throughput"])
    tp = result["throughput"]  # online rows against static evaluation of the same streams and segment
    assert tp["dyneval_all_1stream_seg3"]["vs_static_eval"] == pytest.approx(
        tp["dyneval_all_1stream_seg3"]["tokens_per_s"] / tp["static_eval_1stream_seg3"]["tokens_per_s"])
    assert tp["static_train"]["vs_static_eval"] is None and tp["adam_seg3"]["vs_static_eval"] > 0
    assert all(row["tokens_per_s"] > 0 for row in result["throughput"].values())
    assert result["settings"]["bandwidth_gb_s"] > 0  # the memory-traffic bound of every online and meta row
    for name, row in tp.items():
        if row["kind"] in ("online eval", "static eval", "metatrain"):
            assert row["bytes_per_token"] > 0 and row["of_bound"] == pytest.approx(
                row["tokens_per_s"] / row["bound_tokens_per_s"]), name
    assert tp["dyneval_seg3"]["bytes_per_token"] > tp["static_eval_seg3"]["bytes_per_token"]
    assert tp["static_train"]["of_bound"] is None
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["device"] == "cpu"
    assert "commit" in result["git"] and "dirty" in result["git"]
    assert result["config"]["bench"]["batch_size"] == 2
    assert "| dyneval_vs_static_train |" in capsys.readouterr().out  # the printed table


def test_profiling_a_row_the_bench_does_not_have_is_a_one_line_error(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path / "b.json"), "--device", "cpu", *TINY_BENCH,
                 "--bench.profile=[learned_seg6]"]) == 2
    assert capsys.readouterr().err.startswith("dynlm bench: error: bench.profile: no row 'learned_seg6'; rows: static_train")
    assert not (tmp_path / "b.json").exists()


def test_bench_bad_config_exits_2(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path / "b.json"), "--bench.repeats=0"]) == 2
    assert "--bench.repeats: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path / "b.json"), "--bench.precision=fp16"]) == 2
    assert main(["bench", "--out", str(tmp_path / "b.json"), "--device", "tpu"]) == 2
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_checkpointing_makes_memory_grow_slower_with_the_unroll_length(tmp_path):
    """Peak memory of one meta-step (fresh processes, RSS following live tensors): checkpointed
    unrolls keep each chunk step's memorised state only, so they grow more slowly with K."""
    from dynlm.bench.memory import memory_probe
    from dynlm.config import load_config
    cfg = load_config([], ["model.emb_size=64", "model.hidden_size=128", "bench.vocab_size=2000",
                           "rule.compile=false", "eval.segment_length=35"])
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        peak = {(k, c): pool.apply(memory_probe, (cfg, torch.device("cpu"), k, c))["peak_mib"]
                for k in (4, 24) for c in (False, True)}
    plain_growth = peak[(24, False)] - peak[(4, False)]
    ckpt_growth = peak[(24, True)] - peak[(4, True)]
    assert plain_growth > 0 and ckpt_growth < 0.75 * plain_growth, peak
