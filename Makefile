# BetterBot — the commands a newcomer needs: `make run`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHAIN := devtools/chain
NODE_STAMP := $(CHAIN)/node_modules/.installed

.PHONY: install prereqs-run prereqs-test run test test-fast lint typecheck check compose-check clean docs bench bench-quick chaos

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency files change; constraints.txt pins every version.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The local EVM node (ganache) and Solidity compiler (solc-js) the polygon source's tests run on,
# pinned by package-lock.json; no install script runs (none is needed).
$(NODE_STAMP): $(CHAIN)/package.json $(CHAIN)/package-lock.json
	npm ci --prefix $(CHAIN) --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

install: $(STAMP) $(NODE_STAMP)

# Servers, the Compose parser and Chromium come from Debian's packages: installed with apt-get when
# run as root, else the one command to run is printed (devtools/prereqs.sh).
prereqs-run:
	bash devtools/prereqs.sh run

prereqs-test:
	bash devtools/prereqs.sh test

run: install prereqs-run
	$(BIN)/python -m devtools.run

test: install prereqs-test
	$(BIN)/python -m pytest -q

# Never part of `make test`: the real services under load, about 9-12 minutes (bench/README.md).
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

# Never part of `make test` (that runs a short one): every fault alone, then together, on the whole
# tape, and the cluster failover; about 15 minutes (bounded at 25); writes chaos/results/latest.json
# (docs/chaos.md).
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
	rm -rf $(VENV) $(CHAIN)/node_modules .run .pytest_cache .mypy_cache .ruff_cache
