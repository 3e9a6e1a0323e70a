# `make run`: install into .venv and start the gateway with its built-in provider simulator.
# `make test`: install what the tests need and run ruff, mypy and the whole suite.
# `make check`: the fast lane while editing: ruff, mypy and the tests that need no
# process, browser, nginx, Prometheus, Redis or second gateway (not marked `slow`).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test check bench soak lint typecheck jstest pytest clean

run: $(VENV)/.installed
	$(BIN)/gateway serve

test: $(VENV)/.installed-dev lint typecheck jstest pytest

check: $(VENV)/.installed-dev lint typecheck
	$(BIN)/pytest -m "not slow" -n 4 -q

# 10,000 streams with random fates on each worker class, then the books must balance
# (docs/reliability.md; about 2 minutes). `make test` runs a short version.
soak: $(VENV)/.installed-dev
	$(BIN)/python -m tests.soak

# Benchmarks, not tests: writes docs/benchmarks.md and docs/benchmarks.json (12 to 17 min).
bench: $(VENV)/.installed-dev
	scripts/ensure-apt.sh redis-server
	$(BIN)/python -m bench.run

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check gateway tests bench support scripts
	$(BIN)/ruff format --check gateway tests bench support scripts

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# The browser tests drive Debian's chromium, the cluster tests Debian's redis-server, a
# metrics test Debian's prometheus, the deployment tests Debian's nginx (each test starts
# its own on a free port); node runs the client's unit tests.
pytest: $(VENV)/.installed-dev
	scripts/ensure-apt.sh chromium redis-server prometheus nginx
	# Two at a time here, not four as in make check: CI has two cores, and a test's
	# time bounds must hold with one neighbour, not three.
	$(BIN)/pytest -m "not slow" -n 2
	$(BIN)/pytest -m slow

jstest:
	command -v node >/dev/null || scripts/ensure-apt.sh nodejs
	node --test tests/js/

$(BIN)/python:
	scripts/ensure-python.sh $(PYTHON) $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
