# Two commands on a fresh machine with Python 3.11 and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rollout-proxy demo

# Debian tools the tests drive (promtool); installed only when missing.
system-deps:
	@bash .ci/system-deps

lint: $(STAMP)
	$(BIN)/ruff check proxy tests load
	$(BIN)/mypy

test: $(STAMP) system-deps
	$(BIN)/ruff check proxy tests load
	$(BIN)/mypy
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m load.bench

clean:
	rm -rf $(VENV)
