"""The cost estimator behind `dynlm experiment --estimate`: its FLOP count agrees with the model's
matmuls counted by hand, and its memory grows with the batch the way the short runs say."""
import pytest

from dynlm.cli import main
from dynlm.config import Config, ModelConfig
from dynlm.cost import meta_training_cost, static_training_cost


def tiny_config(**train) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(emb_size=8, hidden_size=16, n_layers=2, softmax="full", dropout_input=0,
                            dropout_hidden=0, dropout_output=0, dropout_emb=0, weight_drop=0)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_static_flops_per_token_are_the_models_matmuls():
    vocab, cfg = 50, tiny_config(batch_size=4, bptt=10)
    e, h = cfg.model.emb_size, cfg.model.hidden_size
    macs = 4 * h * (e + h) + 4 * h * (h + h) + h * e + vocab * e  # two LSTM layers, projection, tied softmax
    cost = static_training_cost(cfg, vocab)
    # forward 2 FLOPs per multiply-add, backward twice that; the first step's h @ w_hh is a zero state
    # the counter still counts, so allow a little
    assert cost["flops_per_token"] == pytest.approx(6 * macs, rel=0.02)
    assert cost["n_params"] == vocab * e + 4 * h * (e + h + 1) + 4 * h * (2 * h + 1) + e * h + vocab


def test_memory_grows_with_the_batch_by_the_measured_activations():
    vocab = 50
    small, big = (static_training_cost(tiny_config(batch_size=b, bptt=10), vocab) for b in (4, 8))
    per_token = (big["memory_bytes"] - small["memory_bytes"]) / (4 * 10)
    assert per_token >= 4 * vocab  # at least the log-distribution over the vocabulary is kept per token
    cfg = tiny_config()
    cfg.meta.batch_size, cfg.meta.unroll, cfg.eval.segment_length, cfg.rule.compile = 2, 4, 5, False
    plain = meta_training_cost(cfg, vocab)
    cfg.meta.checkpoint = True
    ckpt = meta_training_cost(cfg, vocab)
    cfg.meta.unroll = 16
    ckpt16 = meta_training_cost(cfg, vocab)
    cfg.meta.checkpoint = False
    plain16 = meta_training_cost(cfg, vocab)
    assert ckpt["memory_bytes"] < plain["memory_bytes"] and ckpt16["memory_bytes"] < plain16["memory_bytes"]
    assert ckpt["flops_per_token"] > plain["flops_per_token"]  # the recomputed forward


def test_per_stream_weights_make_meta_training_move_more_bytes_per_token():
    vocab, cfg = 50, tiny_config(batch_size=8, bptt=10)
    cfg.meta.batch_size, cfg.meta.unroll, cfg.eval.segment_length, cfg.rule.compile = 8, 2, 10, False
    static, meta = static_training_cost(cfg, vocab), meta_training_cost(cfg, vocab)
    h = cfg.model.hidden_size
    w_hh = 4 * (4 * h * h) * 2  # both layers' recurrent matrices, float32
    # each stream reads its own recurrent matrices at every token, forward and backward
    assert meta["traffic_per_token"] >= 2 * w_hh
    # shared weights are read once per batch: static training moves far fewer bytes per token
    assert static["traffic_per_token"] < meta["traffic_per_token"] / 2


def test_estimate_command_prints_every_arm(capsys):
    assert main(["experiment", "ablate-order", "--scale", "cpu", "--estimate"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip().split(":")[0]: [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| arm ") or line.startswith("| static training")}
    assert set(rows) == {"static training", "arm first-order", "arm second-order"}
    gflop = {k: float(v[2]) for k, v in rows.items()}
    assert gflop["arm second-order"] > gflop["arm first-order"] > 0  # differentiating through the inner gradient
    assert all(v[5] in ("compute", "memory traffic") for v in rows.values())
    assert main(["experiment", "1-level", "--estimate", "--estimate-tflops=0"]) == 2
    assert main(["experiment", "1-level", "--estimate", "--estimate-bandwidth=-1"]) == 2
