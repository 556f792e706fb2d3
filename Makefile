# Set-up commands: `make run` (the default job), `make test` (the CI tier, at most 5 minutes on a 2-core
# machine: everything not marked slow) and `make test-full` (every test, slow tiers included).
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
RUN_ARGS ?=
# Test processes (pytest-xdist): every test runs on one intra-op thread (tests/conftest.py), so one worker
# per core; measured on the 2-core CPU beside two training runs: 7 min 25 s in one process, 5 min 35 s in two.
TEST_WORKERS ?= 2

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch/torchvision first, pinned to the releases this project is tested with.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[test,timm]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/compress run $(RUN_ARGS)

lint: install
	$(VENV)/bin/ruff check compress tests bench scripts

test: install lint
	$(VENV)/bin/python -m pytest -q -m "not slow" -n $(TEST_WORKERS)

test-full: install
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS)

bench: install
	$(VENV)/bin/python bench/train_throughput.py

.PHONY: install lint run test test-full bench
