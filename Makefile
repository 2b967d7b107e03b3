# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   - create .venv, install the pinned environment, run the demo pipeline
#   make test   - the same set-up, then the whole test suite (CI runs this via .ci/run)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stellar-installed
CONF ?= conf/local.yaml
DEMO_STARS ?= 20000
PYTEST_ARGS ?=

.PHONY: setup browser demo test test-fast bench doctor lock pack clean

setup: $(STAMP)

$(STAMP): pyproject.toml deploy/requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2]==(3,11) else 1)' || { echo "error: $(PYTHON) is not Python 3.11"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r deploy/requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m stellar.java --ensure
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stellar --config $(CONF) pipeline --set synth.n_stars=$(DEMO_STARS)

# The report test renders the HTML in headless Chromium (Debian package 'chromium').
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
	  echo "warning: could not install Chromium (apt-get install chromium, as root); the report browser test will fail"

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/synth.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/preprocess.py

# The packed environment spark-submit ships to executors (deploy/README.md).
pack: $(STAMP)
	deploy/pack dist/stellar-env.tar.gz

doctor: $(STAMP)
	$(BIN)/stellar --config $(CONF) doctor

# Regenerate the full pinned environment from pyproject.toml in a scratch venv.
lock:
	rm -rf /tmp/stellar-lock-venv && $(PYTHON) -m venv /tmp/stellar-lock-venv
	/tmp/stellar-lock-venv/bin/pip install --quiet . pytest==9.2.0 venv-pack==0.2.0
	( echo "# Full pinned environment (pip freeze of a fresh install of pyproject.toml on Python 3.11)."; \
	  echo "# Regenerate with: make lock"; echo "torch==2.13.0"; \
	  /tmp/stellar-lock-venv/bin/pip freeze | grep -v -E '^(torch|stellar)[=@ ]' ) > deploy/requirements.lock

clean:
	rm -rf $(VENV) work .pytest_cache build dist
