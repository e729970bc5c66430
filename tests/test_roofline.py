"""The memory-traffic bound of `dynlm bench` (roofline.py): the least bytes per token, counted by hand."""
import pytest
import torch

from dynlm.roofline import META_TRAFFIC, fraction_of_bound, online_bytes_per_token, triad_bandwidth

# float32: embed 10x2 (8 B a row), w_ih and w_hh 64 B each, b 32 B, softmax 80 B
PARAMS = {"embed": torch.zeros(10, 2), "lstm.0.w_ih": torch.zeros(8, 2), "lstm.0.w_hh": torch.zeros(8, 2),
          "lstm.0.b": torch.zeros(8), "out": torch.zeros(10, 2)}
LSTM = ["lstm.0.w_ih", "lstm.0.w_hh", "lstm.0.b"]
B, T = 2, 3


def test_static_evaluation_reads_w_hh_every_step_and_the_rest_once_per_chunk():
    # rows 2*3*8 + w_ih 64 + w_hh 3*64 + b 32 + softmax 80
    assert online_bytes_per_token(PARAMS, [], {}, B, T) == pytest.approx((48 + 64 + 192 + 32 + 80) / (B * T))


def test_adapting_the_lstm_reads_each_streams_copy_forward_and_backward_and_updates_it():
    state = {f"v.{k}": torch.zeros(B, *PARAMS[k].shape) for k in LSTM} | {"t": torch.zeros(B)}
    w_ih = B * 64 * 2 + B * 64 * 3  # forward + backward read per copy; update: read w, g, write w
    w_hh = B * 64 * T * 2 + B * 64 * 3
    b = B * 32 * 2 + B * 32 * 3
    theta0 = 64 + 64 + 32  # shared, read once per chunk
    rule_state = 2 * B * (64 + 64 + 32)  # read and written; the (B,) step counter is not per coordinate
    want = (w_ih + w_hh + b + 48 + 80 + theta0 + rule_state) / (B * T)
    assert online_bytes_per_token(PARAMS, LSTM, state, B, T) == pytest.approx(want)
    assert online_bytes_per_token(PARAMS, LSTM, state, B, T, shared_state=1) == pytest.approx(want + theta0 / (B * T))
    assert META_TRAFFIC[True] > META_TRAFFIC[False] > 1


def test_fraction_of_bound_and_a_measured_bandwidth():
    bound, frac = fraction_of_bound(500.0, 1e6, 2e9)
    assert bound == pytest.approx(2000.0) and frac == pytest.approx(0.25)
    bw = triad_bandwidth(torch.device("cpu"), elements=1 << 20, min_run_time=0.05)
    assert 1e8 < bw < 1e13  # bytes/s: between 0.1 GB/s and 10 TB/s on any CPU
