# Developer entry points. `make demo` runs the operator's lifecycle on a local test world and `make test` runs
# the test suite, each on a fresh machine:
# both create .venv, install the package with its extras and build or locate the test world's tools.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= operator,trainer,inference,dev
PYTEST_ARGS ?=

.PHONY: setup tools test lint demo bench-world bench-operator bench-trainer bench-inference

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

demo: tools
	$(PY) -m charlora.devtools demo

bench-world: tools
	$(PY) bench/world_startup.py

bench-operator: tools
	$(PY) bench/operator_scale.py

bench-trainer: setup
	$(PY) bench/trainer.py

bench-inference: setup
	$(PY) -m bench.inference
