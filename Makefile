# The two commands of the README. Both create or reuse .venv and install the package into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0 in pyproject.toml: pip takes the CPU wheel from local disk.
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Real BIDMC records join the synthetic cohort when ../shared/data is beside the clone.
DATA_ROOT ?= $(wildcard ../shared/data)

demo: $(STAMP)
	$(BIN)/p2es quickstart --out $(DEMO_OUT) $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

test: $(STAMP)
	$(BIN)/python -m pytest

# The unit lane: no Ray, no object store, no ../shared/data, no `slow` unit test (tests/conftest.py adds the
# first three markers from the
# fixtures and calls a test uses). Under 2 minutes on 2 cores.
test-fast: $(STAMP)
	P2ES_FAST=1 $(BIN)/python -m pytest -q -m "not ray and not s3 and not real_data and not slow"

lint: $(STAMP)
	$(BIN)/ruff check p2es_dist tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
