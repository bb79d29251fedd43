# `make demo` and `make test` work on a fresh machine: each creates .venv if missing and installs the project.
# torch==2.13.0 (a CPU wheel on this machine's disk) is installed BEFORE the project so that the project's
# `torch>=2.4` range is already satisfied and pip never resolves it to a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.meshplan-installed

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,hf]'  # hf: transformers, so tests/hf runs (tiny random configs)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/meshplan demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
