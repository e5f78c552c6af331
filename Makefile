# SSJF: speculative shortest-job-first LLM serving.
# `make run` brings the stack up on embedded defaults; `make test` runs every test.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/ssjf/v1/*.proto)
PB_DIR := services/pb

.PHONY: help venv proto proto-check lint test run predictor bench bench-predictor \
        bench-scheduler bench-worker clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so nothing can resolve a newer (CUDA, multi-GB) build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the project with its pinned dependencies

proto: $(STAMP)  ## regenerate services/pb from protos/
	$(BIN)/python -m services.common.protogen $(PB_DIR)

proto-check: $(STAMP)  ## fail when services/pb is stale against protos/
	$(BIN)/python -m services.common.protogen --check $(PB_DIR)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) proto-check  ## run every test (starts its own Redis and services)
	$(BIN)/python -m pytest -q -rs tests

run: $(STAMP)  ## start the whole stack locally on embedded defaults
	$(BIN)/ssjf up

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
