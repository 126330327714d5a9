# Quickstart: `make demo` and `make test`. Each creates .venv on first use, from pyproject.toml.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=
# Test processes (pytest-xdist): 2 fit the 2-core CI machine, where compilation (one core per
# process) is most of the suite's time; TEST_WORKERS=0 runs the tests in this process.
TEST_WORKERS ?= 2

.PHONY: demo test test-fast coverage lint docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e '.[dev,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) examples/demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The tests not marked slow: every library module, about 4 minutes (see docs/development.md).
test-fast: $(STAMP)
	$(VPY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

# Line coverage of ekfac_optax/ by the full suite and by the fast set.
coverage: $(STAMP)
	$(VPY) -m pytest -q --cov=ekfac_optax --cov-report=term $(PYTEST_ARGS)
	$(VPY) -m pytest -q -m "not slow" --cov=ekfac_optax --cov-report=term $(PYTEST_ARGS)

# The docs site (MkDocs: docs/, API pages from the docstrings) in site/; a warning fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict -d site

lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

