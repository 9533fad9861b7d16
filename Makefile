# make demo  - install what is missing, then back up and restore the example apps
# make test  - install what is missing, then lint, type-check and run the whole suite
# make bench - the benchmarks in bench/ (ratios against the raw engine, same run)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_PACKAGES := borgbackup
TEST_PACKAGES := borgbackup runit

.PHONY: demo test lint unit bench system-packages-demo system-packages-test clean

demo: system-packages-demo $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

test: system-packages-test $(STAMP) lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: system-packages-test $(STAMP)
	$(BIN)/python bench/overhead.py

system-packages-demo:
	@scripts/install-system-packages $(DEMO_PACKAGES)

system-packages-test:
	@scripts/install-system-packages $(TEST_PACKAGES)

# The virtualenv is rebuilt only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || scripts/install-system-packages python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
