# make demo  - install what is missing, then back up and restore the example apps
# make test  - install what is missing, then lint, type-check and run the whole suite
# make bench - the benchmarks in bench/ (ratios against the raw engine, same run)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_PACKAGES := borgbackup zstd rsync
TEST_PACKAGES := borgbackup runit zstd rsync e2fsprogs btrfs-progs xfsprogs openssh-server restic apache2
# borg 1.4 has no Debian package here: built from PyPI once, into its own venv.
BORG14_VERSION := 1.4.5
BORG14 ?= /opt/homesafe-borg-$(BORG14_VERSION)
BORG14_BUILD_PACKAGES := gcc pkg-config libssl-dev liblz4-dev libzstd-dev libxxhash-dev libacl1-dev
# The engine-facing tests, run once more against borg 1.4.
BORG14_TESTS := tests/integration/test_roundtrip.py tests/integration/test_archive_operations.py \
    tests/integration/test_restore_parallel.py tests/integration/test_prestart.py tests/e2e

.PHONY: demo test lint bench borg14 system-packages-demo system-packages-test clean

demo: system-packages-demo $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

test: system-packages-test $(STAMP) lint borg14
	$(BIN)/pytest -q
	@echo "== the engine tests again, with borg $(BORG14_VERSION)"
	PATH="$(BORG14)/bin:$$PATH" HOMESAFE_TEST_BORG_VERSION=$(BORG14_VERSION) \
	    $(BIN)/pytest -q -p no:cacheprovider $(BORG14_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: system-packages-test $(STAMP)
	$(BIN)/python bench/overhead.py

borg14:
	@if "$(BORG14)/bin/borg" --version 2>/dev/null | grep -qx 'borg $(BORG14_VERSION)'; then :; else \
	    scripts/install-system-packages $(BORG14_BUILD_PACKAGES) && \
	    $(PYTHON) -m venv "$(BORG14)" && \
	    "$(BORG14)/bin/pip" install --quiet 'borgbackup==$(BORG14_VERSION)' && \
	    "$(BORG14)/bin/borg" --version; \
	fi

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
