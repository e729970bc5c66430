import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only add contention

REPO = Path(__file__).resolve().parents[1]
WIKITEXT2 = Path(os.environ.get("DYNLM_WIKITEXT2", REPO.parent / "shared" / "data" / "wikitext-2"))

# A corpus and model small enough that a whole train/evaluate run takes seconds.
TINY = [
    "data.synthetic.n_train=12", "data.synthetic.n_valid=3", "data.synthetic.n_test=3",
    "data.synthetic.min_tokens=100", "data.synthetic.max_tokens=300",
    "model.emb_size=16", "model.hidden_size=24", "train.batch_size=4", "train.bptt=10",
    "train.max_steps=20", "train.warmup_steps=5", "train.log_every=5", "train.eval_every=10",
    "eval.segment_length=10", "eval.batch_size=3", "log.wandb_mode=disabled",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One tokenized-corpus cache per test module: its runs share the tokenization work."""
    return tmp_path_factory.mktemp("cache")


def pytest_collection_modifyitems(config, items):
    # DYNLM_TEST_DEVICE=cpu (the CPU smoke of `dynlm gpu-check`) runs the gpu tests on the CPU
    if torch.cuda.is_available() or os.environ.get("DYNLM_TEST_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs CUDA (or DYNLM_TEST_DEVICE=cpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
