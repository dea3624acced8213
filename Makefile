# Two set-up commands for a fresh machine (each is safe to re-run):
#   make run    installs fedforge into .venv and runs the offline default experiment
#   make test   installs fedforge with its test extras into .venv, runs the quality gates and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export FEDFORGE_DATA ?= $(abspath ../shared/data)

.PHONY: run test lint install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e .

install-test: $(BIN)/python
	$(BIN)/pip install -e ".[test]"

run: install
	$(BIN)/fedforge run

test: install-test lint
	$(BIN)/python -m pytest -q

# quality gates (also part of `make test`): ruff on everything, mypy strict on the core and the public API, and the
# package byte-compiled by every other Python 3.10+ the machine has
lint: install-test
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy src/fedforge/__init__.py src/fedforge/config.py src/fedforge/options.py src/fedforge/registry.py \
		src/fedforge/errors.py src/fedforge/commands.py src/fedforge/core
	scripts/other-pythons

clean:
	rm -rf $(VENV) runs .pytest_cache
