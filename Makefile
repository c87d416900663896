# Two commands do all set-up on a fresh clone: `make demo` (the main job) and `make test` (the whole suite).
# Each creates .venv and installs the project (editable, with the dev extra) the first time.

VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install chromium demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/fingerprint demo

# The browser tests drive Debian's Chromium (Playwright's own browser download needs a CDN we cannot reach).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  (command -v sudo >/dev/null && sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the browser tests will skip (apt-get install chromium)"

test: install chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
