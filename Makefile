# BetterBot — the commands a newcomer needs: `make run`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast lint typecheck check compose-check clean docs bench bench-quick chaos

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency files change; constraints.txt pins every version.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python -m devtools.run

test: install
	$(BIN)/python -m pytest -q

# Never part of `make test`: the real services under load, about 5-8 minutes (bench/README.md).
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

# Never part of `make test` (that runs a short one): every fault alone, then together, on the whole
# tape; about 7 minutes; writes chaos/results/latest.json (docs/chaos.md).
chaos: install
	$(BIN)/python -m chaos $(CHAOS_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e and not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check shared services devtools tests bench chaos cli examples

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

# The stream contract: docs/asyncapi.{yaml,json} and docs/schemas/, generated from the code.
docs: install
	$(BIN)/python -m cli.docs_gen

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
