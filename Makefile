# Two entry points for a fresh machine (both create .venv in the repository root when missing):
#   make up     set up, then run the whole stack on the built-in demo checkpoint
#   make test   set up, then run the whole test suite (lint included)
SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip --disable-pip-version-check
INSTALLED := $(VENV)/.installed

.PHONY: up test test-fast test-unit test-integration test-reliability lint bench setup
setup: $(INSTALLED)

# torch comes first and pinned: 2.13.0 installs the CPU build offline; any other version or an
# open range would pull gigabytes of CUDA packages.
$(INSTALLED): pyproject.toml clients/python/pyproject.toml requirements/constraints.txt requirements/third-party-clients.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	# one resolution for all: the light client (clients/python, which the server depends on), the
	# server with the benchmark's extras (Ray Serve, matplotlib: their tests run too) and NIXL, and the
	# third-party clients the tests drive the gateway with
	$(PIP) install -q -c requirements/constraints.txt -e clients/python -e ".[test,bench,soak,nixl]" \
		-r requirements/third-party-clients.txt
	touch $(INSTALLED)

up: $(INSTALLED)
	$(VENV)/bin/moe-serve up

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PYTHON) -m pytest

# the quick loop: everything but the tests marked `slow` (pip resolutions, the soak, `up`
# supervision, multi-node clusters, the short bench); `make test`, the one CI runs, runs them too
test-fast: lint
	$(PYTHON) -m pytest -m "not slow"

# the tiers on their own: tests/unit starts no process (seconds), tests/integration runs real stacks,
# tests/reliability injects faults into them; `-m "not slow"` leaves out the longest tests of each tier
test-unit: $(INSTALLED)
	$(PYTHON) -m pytest tests/unit -m "not slow"

test-integration: $(INSTALLED)
	$(PYTHON) -m pytest tests/integration

test-reliability: $(INSTALLED)
	$(PYTHON) -m pytest tests/reliability

bench: $(INSTALLED)
	$(VENV)/bin/moe-serve bench
