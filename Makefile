# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test setup setup-dev lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

setup: $(VENV)/bin/python
	$(PIP) install --quiet -c constraints.txt -e .

setup-dev: $(VENV)/bin/python
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"

demo: setup
	$(VENV)/bin/sgdlab compare --preset demo --out runs/demo --overwrite

test: setup-dev
	$(PY) -m pytest -q -n 2

lint: setup-dev
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf runs .pytest_cache build src/*.egg-info
