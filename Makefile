# aml: make test (one Python), make test-all (every CPython 3.9-3.13 found), make test-dates
# (test-all with the calendar a year ahead and half a year back), make bench.
PYTHON ?= python3
VENV   ?= .venv
PYTEST_ARGS ?= -q

.PHONY: test test-all test-dates bench clean

# Runs the suite with $(PYTHON): with its own pytest when it has one, else from $(VENV), made
# from $(PYTHON) with pytest on first use (see .ci/pytest-python for what it refuses and why).
test:
	@py=$$(bash .ci/pytest-python "$(PYTHON)" "$(VENV)") && echo "$$py -m pytest $(PYTEST_ARGS) test_aml.py" && \
	  "$$py" -m pytest $(PYTEST_ARGS) test_aml.py

# Runs the suite on every CPython 3.9-3.13 on this machine (PATH or pyenv); skips missing ones.
test-all:
	@found=0; for v in 3.9 3.10 3.11 3.12 3.13; do \
	  py=$$(.ci/find-python $$v) || { echo "== Python $$v: not on this machine, skipped"; continue; }; \
	  found=$$((found+1)); echo "== Python $$v: $$py"; \
	  $(MAKE) --no-print-directory test PYTHON=$$py VENV=.venv-$$v || exit 1; \
	done; [ $$found -gt 0 ] || { echo "no CPython 3.9-3.13 found"; exit 1; }

# The suite with every process's calendar shifted (datetime's now/utcnow/today; time.time() and
# file mtimes stay real): no test may depend on today's date. See .ci/clockshift/sitecustomize.py.
SHIFTS ?= 365 -182
test-dates:
	@for d in $(SHIFTS); do \
	  echo "== calendar shifted by $$d days"; \
	  PYTHONPATH="$(CURDIR)/.ci/clockshift$${PYTHONPATH:+:$$PYTHONPATH}" AML_CLOCK_SHIFT_DAYS=$$d \
	    $(PYTHON) -c 'import datetime, os, sys; d = (datetime.date.today() - datetime.date.fromtimestamp(__import__("time").time())).days; sys.exit(0 if abs(d - float(os.environ["AML_CLOCK_SHIFT_DAYS"])) <= 1 else "calendar shift not in effect")' && \
	  PYTHONPATH="$(CURDIR)/.ci/clockshift$${PYTHONPATH:+:$$PYTHONPATH}" AML_CLOCK_SHIFT_DAYS=$$d \
	    $(MAKE) --no-print-directory test-all || exit 1; \
	done

# Benchmarks against the machine's floors (see README "Performance"), e.g.
#   make bench BENCH_ARGS="--sizes 10,100,1000 --scratch /var/tmp/aml-bench"
BENCH_ARGS ?= --sizes 10,100
bench:
	$(PYTHON) bench_aml.py $(BENCH_ARGS)

clean:
	rm -rf .venv .venv-3.* .pytest_cache __pycache__
