# BEM Fleet. `make run` and `make test` bootstrap .venv on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt constraints.txt pyproject.toml | sha256sum | cut -c1-12)
PROFILE ?= smoke
PORT ?= 8080
PYTEST_ARGS ?=
DURATION ?= 5m
SEED ?= 0

.PHONY: install run status stop test lint format typecheck pytest validate bench load-test soak constraints clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

## The main job: the fleet on the embedded Airflow (standalone, SQLite, LocalExecutor).
run: $(STAMP)
	$(BIN)/bem-fleet run --profile $(PROFILE) --port $(PORT)

## Recent fleet runs and the latest run's phases (the metadata DB of `make run` or AIRFLOW_HOME).
status: $(STAMP)
	$(BIN)/bem-fleet status --detailed

stop: $(STAMP)
	$(BIN)/bem-fleet stop --port $(PORT)

validate: $(STAMP)
	$(BIN)/bem-fleet validate

## The whole test suite: lint, types, unit, DAG integrity, end-to-end, integration.
test: lint pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Mission B's soak: the newest run's online learner on the replayed stream for DURATION (24h for a
## real soak); steady-state rollbacks and memory growth in <artifact_root>/soak/mission_b/seed_SEED.
soak: $(STAMP)
	$(BIN)/bem-fleet soak --mission mission_b --duration $(DURATION) --seed $(SEED)

bench: $(STAMP)
	$(BIN)/python bench/bem_vs_lora.py
	$(BIN)/python bench/op_count.py
	$(BIN)/python bench/stats_bench.py
	$(BIN)/python bench/router_overhead.py
	$(BIN)/python bench/long_context.py

## N bem_fleet runs at once through the REST API of a throwaway embedded Airflow (bench/README.md).
load-test: $(STAMP)
	$(BIN)/python bench/load_test.py

## Regenerate constraints.txt from a clean install of requirements-dev.txt (runtime + dev tools).
constraints:
	rm -rf /tmp/bem-fleet-constraints && $(PYTHON) -m venv /tmp/bem-fleet-constraints
	/tmp/bem-fleet-constraints/bin/pip install --quiet -r requirements-dev.txt
	( echo "# Fully pinned environment, generated from a clean install of requirements-dev.txt (Python 3.11):"; \
	  echo "#   make constraints"; \
	  /tmp/bem-fleet-constraints/bin/pip freeze | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' ) > constraints.txt

clean:
	rm -rf artifacts .airflow .pytest_cache .mypy_cache .ruff_cache
