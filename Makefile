# virtshift: make setup | make test | make demo | make lint
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint unit demo bench clean

setup: $(STAMP)
	@scripts/setup-system.sh
	@$(PY) scripts/build-native.py
	@scripts/build-guest.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

test: setup lint
	$(VENV)/bin/pytest -q -ra

unit: setup
	$(VENV)/bin/pytest -q tests/unit

demo: setup
	@scripts/demo.sh

bench: setup
	$(PY) bench/api_store.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
