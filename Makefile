# Developer entry points. `make test` is the one command that runs the test suite on a fresh machine:
# it creates .venv, installs the package with its extras, builds or locates the test world's tools, runs pytest.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= operator,trainer,inference,dev
PYTEST_ARGS ?=

.PHONY: setup tools test lint bench-world

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

setup: $(VENV)/.installed-$(EXTRAS)

tools: setup
	$(PY) -m charlora.devtools ensure

test: tools
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench-world: tools
	$(PY) bench/world_startup.py
