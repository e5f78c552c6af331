# SSJF: speculative shortest-job-first LLM serving.
# `make run` brings the stack up on embedded defaults; `make test` runs every test.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/ssjf/v1/*.proto)
PB_DIR := services/pb

.PHONY: help venv proto proto-check lint test run predictor bench bench-predictor simulate-submit-path \
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

PREDICTOR_FLAGS = --trainable-layers 6 --epochs 6 --max-prompt-tokens 128

predictor: $(STAMP)  ## train the default proxy model into services/predictor/artifacts/default
	$(BIN)/ssjf train-predictor $(PREDICTOR_FLAGS) --out services/predictor/artifacts/default

runs/predictor/comparison.json: | $(STAMP)
	$(BIN)/ssjf train-predictor --compare --keep-fp32 --out runs/predictor

# The shipped configuration again, keeping the fp32 graph and PyTorch weights for the levers.
runs/predictor-shipped/metadata.json: | $(STAMP)
	$(BIN)/ssjf train-predictor $(PREDICTOR_FLAGS) --keep-fp32 --out runs/predictor-shipped

runs/predictor-student3/metadata.json: | $(STAMP)
	$(BIN)/ssjf train-predictor --encoder-layers 3 --trainable-layers 3 --epochs 6 \
		--max-prompt-tokens 128 --keep-fp32 --out runs/predictor-student3

# Reduced grid (~15 min + 3 min simulator on a busy 2-core box): 3 policies x 3 batching x 2 loads,
# real stack, vicuna-13b lengths / 16, B=4, guard 5 s, 3 interleaved rounds; then 1e5 simulated jobs.
bench: $(STAMP)  ## FCFS vs SSJF vs oracle SJF on the real stack -> bench/results/summary.json + plots
	$(BIN)/ssjf bench --out bench/results --policies fcfs,ssjf,sjf-oracle \
		--batching none,dynamic,continuous --loads 0.5,0.9 --duration-s 24 --rounds 3 \
		--length-scale 16 --max-batch-size 4 --max-wait-s 5
	$(BIN)/ssjf simulate --latency-dir bench/results --out bench/results/simulated \
		--loads 0.5,0.7,0.9,0.95 --requests 100000 --length-scale 16 --max-batch-size 4 \
		--max-wait-s 5

bench-predictor: $(STAMP) runs/predictor/comparison.json runs/predictor-shipped/metadata.json runs/predictor-student3/metadata.json  ## formulations x accuracy, latency, throughput, speed levers -> bench/results/predictor*.json
	$(BIN)/python -m services.predictor.bench
	nice -n 10 $(BIN)/python -m services.predictor.levers --candidate runs/predictor-shipped \
		--student runs/predictor-student3

simulate-submit-path: $(STAMP)  ## sync vs async (two-stage) prediction, 1e5 simulated jobs at load 0.9 -> bench/results/submit_path_sim.json
	nice -n 10 $(BIN)/python -m services.predictor.submit_path_sim --requests 100000 --load 0.9

bench-scheduler: $(STAMP)  ## dispatch latency, submissions/s, 1e3-1e6 queued vs redis-benchmark -> bench/results/scheduler.json
	$(BIN)/python -m services.scheduler.bench --out bench/results/scheduler.json

bench-worker: $(STAMP)  ## worker engine: tok/s + step latency per batching mode, prefill cost -> bench/results/worker.json
	$(BIN)/python -m services.worker.bench

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
