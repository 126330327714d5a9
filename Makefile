# Quickstart: `make demo` and `make test`. Each creates .venv on first use, from pyproject.toml.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e '.[dev,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) examples/demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

