# `make demo` and `make test` each set up .venv from scratch on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/spectral-diffusion: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/spectral-diffusion

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

demo: install
	$(BIN)/spectral-diffusion demo --out demo-output

.PHONY: install test demo
