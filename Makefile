# Two commands do everything on a fresh machine:
#   make up     set up .venv and run `clotho up` (the whole mesh on CPU, training visibly)
#   make test   set up .venv with the test extras and the client toolchains (Go from
#               Debian's packages, the TypeScript client's npm packages), then run the
#               test suite (pytest)
#   make lint   ruff (lint + format check), mypy, import contracts, buf lint and buf breaking
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch goes in first; nothing else in the project asks for a newer one.
TORCH ?= torch==2.13.0
PIP = $(VENV)/bin/pip
STEPS ?= 200
PYTEST_ARGS ?=
# `buf breaking` compares proto/ with the proto/ it must stay compatible with (scripts/breaking_ref.sh:
# before the last commit that changed it, or HEAD's while proto/ has uncommitted changes).
BREAKING_REF ?= $(shell scripts/breaking_ref.sh)
# buf clones .git 50 commits deep unless told: a ref further back than that fails to
# check out, so clone as deep as the history is.
BREAKING_DEPTH ?= $(shell git rev-list --count HEAD 2>/dev/null || echo 50)

.PHONY: up test setup setup-test setup-clients protos lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The C fast paths are compiled by the install: a changed source installs again.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml services/gateway/trajectory/_scored_fast.c services/common/_otlp_fast.c
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q "$(TORCH)" -e ".[test]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# The clients' toolchains (clients/go, clients/typescript). Go and its gRPC/protobuf
# libraries come from Debian (the Go module proxy may be unreachable; the Go module
# builds offline with clients/go/offline/go.debian.mod). Name the protobuf 1.5 package:
# apt would otherwise pick 1.3, whose generated code panics at the first RPC. Each step
# runs only when its result is missing, so a second run costs nothing.
GO_DEBS = golang-go protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev \
	golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TS_DIR = clients/typescript

setup-clients: $(TS_DIR)/node_modules/.installed
	@if ! dpkg -s $(GO_DEBS) >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) apt-get install -y -q --no-install-recommends $(GO_DEBS); \
	fi

$(TS_DIR)/node_modules/.installed: $(TS_DIR)/package.json $(TS_DIR)/package-lock.json
	cd $(TS_DIR) && npm ci --no-audit --no-fund
	touch $@

up: setup
	$(VENV)/bin/clotho up --steps $(STEPS)

test: setup-test setup-clients
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Every check runs, and the recipe fails when any of them failed. Settings live in
# pyproject.toml ([tool.ruff], [tool.mypy], [tool.importlinter]) and buf.yaml.
# `ruff check --fix .` and `ruff format .` apply the mechanical fixes.
LINT_CHECKS = \
	"ruff check ." \
	"ruff format --check ." \
	"mypy" \
	"lint-imports --no-cache" \
	"buf lint" \
	"buf breaking proto --against .git\#ref=$(BREAKING_REF),subdir=proto,depth=$(BREAKING_DEPTH)"

lint: setup-test
	@failed=""; \
	for check in $(LINT_CHECKS); do \
	  echo "== $$check"; \
	  $(VENV)/bin/$$check || failed="$$failed [$$check]"; \
	done; \
	if [ -n "$$failed" ]; then echo "make lint failed:$$failed" >&2; exit 1; fi; \
	echo "make lint: all checks passed"

# Every language's stubs from proto/ (Python, TypeScript, Go): scripts/gen_protos.py.
protos: setup-test setup-clients
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python scripts/gen_protos.py
	$(VENV)/bin/buf lint

clean:
	rm -rf $(VENV) .clotho
