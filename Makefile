# The two commands of the README: `make run` (set up, then the whole pipeline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install run test lint bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	@# jemalloc makes CPU training faster (see BENCHMARKS.md); optional, installed where we may.
	@if ! ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1 && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq libjemalloc2 >/dev/null) || echo "note: jemalloc not installed; using system malloc"; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

run: install
	dvc repro

test: install
	ruff check .
	pytest

clean-venv:
	rm -rf $(VENV)
