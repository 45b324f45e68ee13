# Two commands for a fresh machine:  `make train`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup train test test-all bench
$(BIN)/titans-scale: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# DS_BUILD_OPS=0: DeepSpeed JIT-builds only what it uses; torch pinned in pyproject.
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/titans-scale

train: setup
	$(BIN)/titans-scale train --config configs/tiny.toml

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q
