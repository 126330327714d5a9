# Quickstart: `make demo` and `make test`. Each creates .venv on first use, from pyproject.toml.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test test-fast coverage lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e '.[dev,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) examples/demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# The tests not marked slow: every library module, about 3 minutes (see the README).
test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Line coverage of ekfac_optax/ by the full suite and by the fast set.
coverage: $(STAMP)
	$(VPY) -m pytest -q --cov=ekfac_optax --cov-report=term $(PYTEST_ARGS)
	$(VPY) -m pytest -q -m "not slow" --cov=ekfac_optax --cov-report=term $(PYTEST_ARGS)

lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

