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


def test_resume_falls_back_past_unreadable_checkpoints_only(tmp_path):
    from dynlm.checkpoint import CheckpointWarning, load_latest_checkpoint, resume_candidates

    assert load_latest_checkpoint(tmp_path) is None  # nothing to resume: the caller starts fresh
    for step in (10, 20, 30):
        save_rotating(_state(step), tmp_path, step)
    assert [p.name for p in resume_candidates(tmp_path)] == [
        "ckpt_step00000030.pt", "ckpt_step00000020.pt", "ckpt_step00000010.pt", "last.pt"]
    (tmp_path / "ckpt_step00000030.pt").write_bytes(b"\x00" * 10)
    with pytest.warns(CheckpointWarning, match=r"ckpt_step00000030\.pt.*truncated or corrupted"):
        state, path = load_latest_checkpoint(tmp_path)
    assert (state["step"], path.name) == (20, "ckpt_step00000020.pt")
    assert (tmp_path / "ckpt_step00000030.pt").exists()  # kept for inspection, never deleted

    def refuse(state, path):  # an incompatible checkpoint is the user's error: no silent fallback
        raise CheckpointError(f"{path.name} does not fit")

    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="ckpt_step00000020.pt does not fit"):
        load_latest_checkpoint(tmp_path, check=refuse)
    for p in tmp_path.glob("*.pt"):
        p.write_bytes(b"junk")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_latest_checkpoint(tmp_path)


def test_config_mismatches_names_each_differing_key():
    from dynlm.checkpoint import config_mismatches

    saved = {"model": {"hidden_size": 24, "n_layers": 1}, "train": {"lr": 1e-3, "bptt": 10}, "data": {"path": "a"}}
    now = {"model": {"hidden_size": 32, "n_layers": 1, "new_option": 5}, "train": {"lr": 5e-4, "bptt": 20},
           "data": {"path": "b"}}
    assert config_mismatches(saved, now, ["model", "train.bptt", "data"], ignore=["data.path"]) == [
        "model.hidden_size: checkpoint 24, now 32", "train.bptt: checkpoint 10, now 20"]


def test_garbage_file_error_does_not_advise_unsafe_loading(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "x.pt")
    assert "x.pt (7 bytes)" in str(e.value) and "weights_only` set to `False" not in str(e.value)
