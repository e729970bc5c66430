"""Atomic, weights_only checkpoints: round trip, corruption, rotation, RNG state."""
import random

import numpy as np
import pytest
import torch

from dynlm.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, rng_state,
                              save_checkpoint, save_rotating, set_rng_state)


def _state(step=1):
    model = torch.nn.Linear(4, 3)
    return {"model": model.state_dict(), "step": step, "config": {"train": {"lr": 1e-3, "tags": ["a"]}},
            "rng": rng_state(), "history": [1.5, 2.0]}


def test_round_trip_weights_only(tmp_path):
    s = _state(7)
    path = save_checkpoint(s, tmp_path / "ck.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp files left behind
    back = load_checkpoint(path)
    assert back["step"] == 7 and back["config"] == s["config"] and back["history"] == [1.5, 2.0]
    for k, v in s["model"].items():
        assert torch.equal(back["model"][k], v)


def test_truncated_file_raises_and_previous_survives(tmp_path):
    good = save_checkpoint(_state(1), tmp_path / "good.pt")
    bad = save_checkpoint(_state(2), tmp_path / "bad.pt")
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="bad.pt.*truncated or corrupted"):
        load_checkpoint(bad)
    assert load_checkpoint(good)["step"] == 1
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="missing.pt.*not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rotation_keeps_last_n(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (100, 200, 300, 400, 500):
        save_rotating(_state(step), tmp_path, step, keep_last=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt_step00000300.pt", "ckpt_step00000400.pt", "ckpt_step00000500.pt", "last.pt"]
    assert latest_checkpoint(tmp_path).name == "last.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 500
    (tmp_path / "last.pt").unlink()
    assert latest_checkpoint(tmp_path).name == "ckpt_step00000500.pt"


def _draw():
    return random.random(), float(np.random.rand()), np.random.randn(), torch.rand(3).tolist()


def test_rng_state_round_trip(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    np.random.randn()  # leave numpy with a cached gaussian so has_gauss/gauss are exercised
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = _draw()
    _draw(); _draw()  # move every generator on
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draw() == expected
