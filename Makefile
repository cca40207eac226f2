# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

# torch goes first and pinned: the CPU build comes from local disk; an unpinned torch pulls CUDA.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q hivemind==1.1.12
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sentinel-swarm --compare-clean --report runs/demo/report.json

test: $(STAMP)
	$(VENV)/bin/ruff check sentinel tests bench
	bash scripts/install-browser.sh
	$(PY) -m pytest -q -p no:cacheprovider -n 2 -m "not swarm" tests
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 -m swarm tests

# Everything but the live multi-process swarms (pytest -m swarm), on both cores: about 2 minutes.
# The live swarms run one at a time after it: each already keeps both cores busy.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check sentinel tests bench
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --durations=10 -m "not swarm" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check sentinel tests bench

bench: $(STAMP)
	$(PY) bench/swarm_throughput.py
	$(PY) bench/screening.py

clean:
	rm -rf $(VENV) build dist *.egg-info runs
