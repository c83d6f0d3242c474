# The two commands of the README: `make demo` runs the gateway with demo workers on the
# embedded defaults and a second pipeline, apparel (stox/demo.yaml: `--demo`); `make test` runs lint, the type checker and the whole test suite. Both create .venv.
# The interpreter is the newest CPython 3.12+ found (scripts/find_python), else python3;
# `make PYTHON=/path/to/python3 VENV=.venv311 test` chooses another, in a venv of its own.
PYTHON ?= $(shell scripts/find_python)
PYTHON := $(PYTHON)
VENV ?= .venv
PY := $(VENV)/bin/python
# a stamp naming the interpreter's version: when another one is chosen, the venv is made anew
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; print(sys.version.split()[0])')
ifeq ($(PYTHON_VERSION),)
$(error $(PYTHON) does not run)
endif
INTERPRETER := $(VENV)/.python-$(PYTHON_VERSION)

.PHONY: demo test lint format bench bench-ws binary fuzz

$(INTERPRETER):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	touch $@

# the project itself too, editable: the `stox` command, and imports of stox, handlers,
# settings… from any directory (the tests' subprocesses, bench/)
$(VENV)/.runtime: $(INTERPRETER) requirements.txt pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt requirements-binary.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) server.py --demo

test: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest

# one self-contained executable, dist/stox (interpreter, packages, dashboard, protos inside)
$(VENV)/.binary: $(VENV)/.runtime requirements-binary.txt
	$(PY) -m pip install -q -r requirements-binary.txt
	touch $@

binary: $(VENV)/.binary
	$(PY) packaging/build.py
	@ls -l dist/stox

format: $(VENV)/.dev
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# the benchmark's own packages (Celery, for the peer) stay out of the runtime requirements
$(VENV)/.bench: $(VENV)/.runtime bench/requirements.txt
	$(PY) -m pip install -q -r bench/requirements.txt
	touch $@

bench: $(VENV)/.bench
	$(PY) bench/e2e.py --peers

# WebSocket scale (issue 9, item 4): idle sockets, fan-out, streams; its own gateway
bench-ws: $(VENV)/.runtime
	$(PY) bench/ws.py

# Schemathesis against a real gateway (issue 12, item 2): 520 examples per operation and mode
# (10,000+ in all) and 300 stateful scenarios along the document's links; prints the counts
fuzz: $(VENV)/.dev
	$(PY) tests/fuzz.py --examples 520 --scenarios 300
