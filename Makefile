# Everything a developer or CI runs. `make test` and `make demo` set
# themselves up from nothing: a .venv with the project and all its extras.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PY_PACKAGES := fedcore aggregator clients privacy api
# e.g. make demo DEMO_FLAGS=--secure-aggregation (or --dp-epsilon 8)
DEMO_FLAGS ?=

.PHONY: all setup check lint types layers docker-lint test demo bench clean

all: test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check $(PY_PACKAGES) tests bench
	$(BIN)/ruff format --check $(PY_PACKAGES) tests bench

types: $(STAMP)
	$(BIN)/mypy

layers: $(STAMP)
	$(BIN)/lint-imports

docker-lint: $(STAMP)
	$(BIN)/hadolint docker/aggregator.Dockerfile docker/client.Dockerfile

check: lint types layers docker-lint

# The tests run in parallel processes (pytest-xdist), one per CPU, at most 4;
# plain `pytest` runs them in one process.
test: check
	$(BIN)/pytest --numprocesses auto --maxprocesses 4

demo: $(STAMP)
	$(BIN)/fedcore demo $(DEMO_FLAGS)

bench: $(STAMP)
	$(BIN)/python bench/aggregate.py
	$(BIN)/python bench/round_latency.py
	$(BIN)/python bench/simulate.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache demo-output
