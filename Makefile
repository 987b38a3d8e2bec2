# Two commands do everything on a fresh machine:
#   make up     set up .venv and run `clotho up` (the whole mesh on CPU, training visibly)
#   make test   set up .venv with the test extras and run the test suite (pytest)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch goes in first; nothing else in the project asks for a newer one.
TORCH ?= torch==2.13.0
PIP = $(VENV)/bin/pip
STEPS ?= 200
PYTEST_ARGS ?=

.PHONY: up test setup setup-test protos lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The C fast path is compiled by the install: a changed source installs again.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml services/gateway/trajectory/_scored_fast.c
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q "$(TORCH)" -e ".[test]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

up: setup
	$(VENV)/bin/clotho up --steps $(STEPS)

test: setup-test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

protos: setup-test
	$(VENV)/bin/python scripts/gen_protos.py
	$(VENV)/bin/buf lint

clean:
	rm -rf $(VENV) .clotho
