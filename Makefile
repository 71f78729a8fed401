# aml: make test (one Python), make test-all (every CPython 3.9-3.13 found), make bench.
PYTHON ?= python3
VENV   ?= .venv
PYTEST_ARGS ?= -q

.PHONY: test test-all bench clean

# Runs the suite with $(PYTHON); installs pytest into $(VENV) first if it is missing.
test:
	@$(VENV)/bin/python -c "import pytest" 2>/dev/null || \
	  { $(PYTHON) -m venv $(VENV) && $(VENV)/bin/python -m pip install -q --disable-pip-version-check pytest; }
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) test_aml.py

# Runs the suite on every CPython 3.9-3.13 on this machine (PATH or pyenv); skips missing ones.
test-all:
	@found=0; for v in 3.9 3.10 3.11 3.12 3.13; do \
	  py=$$(.ci/find-python $$v) || { echo "== Python $$v: not on this machine, skipped"; continue; }; \
	  found=$$((found+1)); echo "== Python $$v: $$py"; \
	  $(MAKE) --no-print-directory test PYTHON=$$py VENV=.venv-$$v || exit 1; \
	done; [ $$found -gt 0 ] || { echo "no CPython 3.9-3.13 found"; exit 1; }

# Benchmarks against the machine's floors (see README "Performance"), e.g.
#   make bench BENCH_ARGS="--sizes 10,100,1000 --scratch /var/tmp/aml-bench"
BENCH_ARGS ?= --sizes 10,100
bench:
	$(PYTHON) bench_aml.py $(BENCH_ARGS)

clean:
	rm -rf .venv .venv-3.* .pytest_cache __pycache__
