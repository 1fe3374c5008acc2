# keybrake — everything a fresh machine needs goes through these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast soak-model lint typecheck pytest templates tools bench install dist clean

# Test workers: one per core (pytest-xdist; idle workers steal queued tests, so the long ones
# do not end the run alone). Each worker has its own localstripe, proxies on
# sockets bound before they start, and databases of its own (SQLite files under its tmp_path,
# PostgreSQL databases with random names), so workers never share state.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Each test worker and each process a test starts reuses the bytecode the first one compiled.
unexport PYTHONDONTWRITEBYTECODE

# Debian packages the tests run, installed when missing (`sudo` when not root): promtool checks
# templates/observability/ (its service is not started in a container), and the dashboard's
# browser test drives headless chromium through chromium-driver.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The demo needs the package and its `demo` extra (the Stripe SDK, localstripe) only: not the test
# tools (mypy, ruff, selenium, ...). A venv the tests installed has them already.
DEMO_STAMP := $(VENV)/.demo-installed
$(DEMO_STAMP): pyproject.toml
	@if [ -f $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ]; then touch $@; exit 0; fi; \
	$(PYTHON) -m venv $(VENV) && \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[demo]' && \
	touch $@

## The main job on the embedded default: SQLite + localstripe, no vendor account needed.
demo: $(DEMO_STAMP)
	$(BIN)/keybrake demo

## The test command CI runs: lint, types, rendered templates up to date, the whole suite.
test: $(STAMP) lint typecheck templates pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check cli proxy hera_workflows reaper adopt tests

typecheck: $(STAMP)
	@mkdir -p .typecheck/keybrake
	@for d in cli proxy hera_workflows reaper adopt; do ln -sfn ../../$$d .typecheck/keybrake/$$d; done
	$(BIN)/mypy

templates: $(STAMP)
	@if $(BIN)/keybrake templates --help >/dev/null 2>&1; then $(BIN)/keybrake templates render --check; fi

tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { \
	  echo "installing headless Chromium (Debian packages chromium, chromium-driver)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

pytest: $(STAMP) tools
	$(BIN)/pytest -n $(JOBS) --dist worksteal

## The money model on many more random sequences (minutes to hours); SEED=... repeats a run.
# Drawn once (`:=`): a recursive `?=` drew one seed for the echo and another for the run.
ifndef SEED
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
EXAMPLES ?= 2000
soak-model: $(STAMP)
	@echo "money model soak: seed $(SEED), $(EXAMPLES) examples per backend"
	KEYBRAKE_MODEL_EXAMPLES=$(EXAMPLES) $(BIN)/pytest tests/model \
	  --hypothesis-seed=$(SEED) -s

## A quick loop while working: everything but the end-to-end runs (tests/e2e/), SQLite only.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	KEYBRAKE_TEST_BACKENDS=sqlite $(BIN)/pytest -n $(JOBS) --dist worksteal -m "not e2e"

# `make bench COMPARE_WITH=REV`: only priced calls, this checkout against git revision REV.
bench: $(STAMP)
	$(BIN)/python -m tests.bench.run $(if $(COMPARE_WITH),--compare-with $(COMPARE_WITH))

## The release: a wheel and an sdist in dist/, built offline with the venv's setuptools; the
## build fails on any warning. Install with `pip install dist/keybrake-*.whl`.
dist: $(STAMP)
	$(BIN)/python -m tests.release dist

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache dist
