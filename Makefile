# Fresh machine needs only python3 (>=3.10) and make.  GPU users: `make venv TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`
# or use environment.yml with conda.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test bench gpu-check clean

venv: $(VENV)/.installed

# The stamp only goes stale when pyproject.toml changes, so a second `make venv` is a no-op.
# torch goes first so TORCH_SPEC (CPU/CUDA build) wins over the generic `torch>=2.2` dependency.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/dynlm demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/dynlm bench --out runs/bench.json

# Removes build/test litter and run outputs; keeps .venv (slow to rebuild) — `rm -rf .venv` for that.
clean:
	rm -rf runs build dist *.egg-info .pytest_cache wandb
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# One timed run (10 min on one GPU) that proves the CUDA, bf16 and multi-GPU paths; report in runs/gpu_check/.
# `make gpu-check DEVICE=cpu ARGS=--tiny` is the CPU smoke that the test suite runs.
DEVICE ?= cuda
gpu-check: venv
	$(BIN)/dynlm gpu-check --device $(DEVICE) $(ARGS)
