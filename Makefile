# Two set-up commands for a fresh machine (each is safe to re-run):
#   make run    installs fedforge into .venv and runs the offline default experiment
#   make test   installs fedforge with its test extras into .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export FEDFORGE_DATA ?= $(abspath ../shared/data)

.PHONY: run test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e .

install-test: $(BIN)/python
	$(BIN)/pip install -e ".[test]"

run: install
	$(BIN)/fedforge run

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
