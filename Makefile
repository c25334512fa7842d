# Two commands do all the set-up: `make demo` (main job on the embedded digits data) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# W&B mode of the test targets: off by default; `WANDB_MODE=offline make test` also exercises the
# W&B logging (offline runs are written under each test's temporary directory), as CI does.
WANDB_MODE ?= disabled

.PHONY: install demo test test-slow test-all test-torchvision bench bench-smoke clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,ray,qd,control,export]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	WANDB_SILENT=true $(BIN)/growprune fit -c configs/quickstart.yaml

test: $(STAMP)
	WANDB_MODE=$(WANDB_MODE) $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	WANDB_MODE=$(WANDB_MODE) $(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]  # 5: none selected

test-all: $(STAMP)
	WANDB_MODE=$(WANDB_MODE) $(BIN)/python -m pytest -q -m "slow or not slow"

# the torchvision models `make test` skips by size, built for real (CI runs it after `make test`)
test-torchvision: $(STAMP)
	WANDB_MODE=$(WANDB_MODE) $(BIN)/python -m pytest -q -m slow tests/test_torchvision_models.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.throughput

# the smoke benchmark suite: leaderboard files and plots in runs/benchmark/smoke (W&B as WANDB_MODE says)
bench-smoke: $(STAMP)
	WANDB_SILENT=true $(BIN)/growprune benchmark --suite smoke --workers 2

clean:
	rm -rf $(VENV) runs .pytest_cache
