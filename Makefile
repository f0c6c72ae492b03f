# Bootstrap: a virtual environment with torch pinned first (so pip keeps the wheel that fits the
# machine: CPU here, CUDA on a GPU machine), then this project and its test tools.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart ice test lint bench clean

$(BIN)/campaign: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/campaign

setup: $(BIN)/campaign

quickstart: setup
	$(BIN)/campaign launch specs/quickstart.yaml

ice: setup
	$(BIN)/campaign launch specs/ice.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/bench_campaign.py

clean:
	rm -rf $(VENV) mlflow.db mlartifacts
