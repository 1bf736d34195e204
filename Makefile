# The two commands a newcomer needs: `make demo` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.isosweep-installed
PYTEST_ARGS ?=

.PHONY: help install prometheus demo test test-extended test-fast test-gpu bench clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Pinned, known-good versions (torch 2.14.1 + torchvision 0.29.1: see README "Installing").
	$(PY) -m pip install --disable-pip-version-check -q -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

## install: create .venv and install the package with its test extra at the pinned versions
install: $(STAMP)

## help: these descriptions (the `## ` lines of this Makefile)
help:
	@sed -n -e 's/^## \([a-z-]*:\)/\1/p' -e 's/^## /    /p' $(MAKEFILE_LIST)

## demo: set up, then run the built-in demo sweep on an embedded local Ray
demo: install
	$(VENV)/bin/isosweep run search_spaces/demo.yaml $(DEMO_ARGS)

## prometheus: the Prometheus server that tests/test_sweep.py scrapes a Ray cluster with (Debian's package,
## installed as root when no `prometheus` is found; elsewhere the test says how and skips that part)
prometheus:
	@command -v prometheus >/dev/null 2>&1 || test -x /usr/bin/prometheus || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; } || \
	  echo "note: no prometheus binary (apt-get install prometheus): tests/test_sweep.py skips its Prometheus checks (fails them when CI is set)"

## test: set up, then run the test suite (Ray, MLflow, S3 and Prometheus servers on loopback included), all but the
## two tests of ten minutes or more that test-extended runs
test: install prometheus
	$(PY) -m pytest -m "not extended" $(PYTEST_ARGS)

## test-extended: the 256 px real-size run of the paper's main setting and the sweep that loses its whole cluster
test-extended: install prometheus
	$(PY) -m pytest -m extended $(PYTEST_ARGS)

## test-fast: only the tests that start no Ray, MLflow or S3 server
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## test-gpu: only the GPU tests (fp16/bf16 steps and resume, NCCL with two devices, TF32 during evaluation,
## every metric and the served model on CUDA)
test-gpu: install
	$(PY) -m pytest -m gpu -rs $(PYTEST_ARGS)

## bench: the CPU benchmarks of the isometry step, the Jacobian and sampling
bench: install
	$(PY) -m bench.iso_step
	$(PY) -m bench.jacobian
	$(PY) -m bench.sampling

## clean: remove .venv and pytest's cache
clean:
	rm -rf $(VENV) .pytest_cache
