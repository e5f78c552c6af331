# SSJF: speculative shortest-job-first LLM serving.
# `make run` brings the stack up on embedded defaults; `make test` runs every test.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/ssjf/v1/*.proto)
PB_DIR := services/pb

.PHONY: help venv proto proto-check lint test test-faults soak run predictor bench simulate-submit-path bench-predictor-sweep bench-predictor-crossval bench-predictor-probe bench-predictor-distill predictor-probe predictor-distilled \
        bench-predictor bench-scheduler bench-worker bench-http bench-security bench-streams clean bench-sim bench-stack \
        bench-stack-starvation bench-stack-light bench-stack-sync bench-stack-precise bench-stack-workers bench-stack-slo bench-sim-full bench-real \
        images images-monitoring stubs test-compose

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so nothing can resolve a newer (CUDA, multi-GB) build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt
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

test-faults: $(STAMP)  ## the fault suite alone (part of `make test`): real processes, each case bounded
	$(BIN)/python -m pytest -q -rs tests/test_faults_engine.py tests/test_faults_gateway.py \
		tests/test_faults_inputs.py tests/test_faults_stack.py

soak: $(STAMP)  ## ~10 min soak: random clients, cancels, disconnects; invariant, RSS, keys -> bench/results/soak.json
	nice -n 10 $(BIN)/python -m tests.soak --duration-s 600 --out bench/results/soak.json

run: $(STAMP)  ## start the whole stack locally on embedded defaults
	$(BIN)/ssjf up

PREDICTOR_FLAGS = --trainable-layers 6 --epochs 6 --serve-max-prompt-tokens 128

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

# The benchmark grids (docs/bench.md). `make bench` is the headline (~30 min on this 2-core box):
# the simulator grid with 95% intervals (40,000 jobs per point, ~5 min), then the real-stack
# grid (4 policies x 3 batching modes x 2 loads, 3 interleaved rounds recalibrated each round,
# ~25 min, estimated: not yet timed on a quiet machine). Larger grids sit behind their own
# targets; BENCH_STACK_FLAGS / BENCH_SIM_FLAGS add or override flags (e.g.
# BENCH_STACK_FLAGS="--duration-s 600 --rounds 6" for tighter intervals).
BENCH_POLICIES    ?= fcfs,ssjf,sjf-prompt,sjf-oracle
BENCH_COMMON      := --length-scale 16 --max-batch-size 4
BENCH_STACK_FLAGS ?=
BENCH_SIM_FLAGS   ?=
BENCH_SIM         := $(BIN)/ssjf simulate --latency-dir bench/results $(BENCH_COMMON)

bench: bench-sim bench-stack  ## headline: simulator grid with CIs, then the real-stack grid (~30 min)

bench-sim: $(STAMP)  ## simulator headline grid with 95% CIs -> bench/results/sim/headline (~5 min)
	$(BENCH_SIM) --out bench/results/sim/headline --policies $(BENCH_POLICIES),hrrn \
		--loads 0.5,0.7,0.9,0.95 --requests 40000 --rounds 20 --max-wait-s 0 --resamples 500 \
		$(BENCH_SIM_FLAGS)

bench-stack: $(STAMP)  ## real-stack headline grid with CIs -> bench/results/stack (~25 min)
	$(BIN)/ssjf bench --out bench/results/stack --policies $(BENCH_POLICIES) \
		--batching none,dynamic,continuous --loads 0.5,0.9 --duration-s 36 --rounds 3 \
		--recalibrate round --max-wait-s 0 $(BENCH_COMMON) $(BENCH_STACK_FLAGS)

bench-stack-starvation: $(STAMP)  ## real stack: SSJF without and with a 1 s guard (a wait about the unloaded p99 JCT here, 0.8 s; a 20 s guard never fires at this scale) beside FCFS at load 0.9 (~27 min)
	$(BIN)/ssjf bench --out bench/results/stack-starvation \
		--policies fcfs,ssjf:noguard,ssjf:guard=1,sjf-oracle --batching none,dynamic,continuous \
		--loads 0.9 --duration-s 90 --rounds 3 --max-wait-s 0 $(BENCH_COMMON) $(BENCH_STACK_FLAGS)

bench-stack-light: $(STAMP)  ## real stack at light load (0.3, 0.5): does SSJF cost anything where few wait? 10 short counterbalanced rounds per point (~40 min)
	$(BIN)/ssjf bench --out bench/results/stack-light --policies fcfs,ssjf \
		--batching none,dynamic,continuous --loads 0.3,0.5 --duration-s 150 --rounds 10 \
		--recalibrate round --max-wait-s 0 $(BENCH_COMMON) $(BENCH_STACK_FLAGS)

bench-stack-sync: $(STAMP)  ## real stack: SSJF's asynchronous submit path against waiting for each prediction (ssjf:sync), loads 0.5 and 0.9, no and continuous batching (~20 min)
	for b in none continuous; do $(BIN)/ssjf bench --out bench/results/stack-sync-$$b \
		--policies fcfs,ssjf,ssjf:sync --batching $$b --loads 0.5,0.9 --duration-s 60 --rounds 3 \
		--recalibrate round --max-wait-s 0 $(BENCH_COMMON) $(BENCH_STACK_FLAGS) || exit 1; done

bench-stack-precise: $(STAMP)  ## real stack, continuous at load 0.9, ~16,000 jobs per policy in 25 rounds, for a narrow interval (~60 min)
	$(BIN)/ssjf bench --out bench/results/stack-precise --policies fcfs,ssjf \
		--batching continuous --loads 0.9 --duration-s 1500 --rounds 25 --recalibrate round \
		--saturation-jobs 160 --max-wait-s 0 $(BENCH_COMMON) $(BENCH_STACK_FLAGS)

bench-stack-workers: $(STAMP)  ## real stack with 2 and 4 workers, each run replayed in the simulator
	for w in 2 4; do $(BIN)/ssjf bench --out bench/results/stack-workers-$$w --workers $$w \
		--policies $(BENCH_POLICIES) --batching continuous --loads 0.5,0.9 --duration-s 45 \
		--rounds 3 --max-wait-s 0 $(BENCH_COMMON) $(BENCH_STACK_FLAGS) || exit 1; done

bench-stack-slo: $(STAMP)  ## real stack: highest arrival rate under the SLO per policy, 120 jobs per evaluation (~30 min)
	$(BIN)/ssjf bench --out bench/results/stack-slo --slo-search --policies fcfs,ssjf,sjf-oracle \
		--batching none,continuous --requests 120 --max-wait-s 0 $(BENCH_COMMON) $(BENCH_STACK_FLAGS)

# SmolLM2 answering the held-out AlpacaEval prompts to EOS (no replay), the greedy labels as
# the oracle; one SmolLM2 worker per policy, the policies taking turns round by round.
bench-real: $(STAMP)  ## real generation: fcfs, ssjf, sjf-oracle on SmolLM2 at load 0.9 -> bench/results/real (~45 min)
	$(BIN)/ssjf bench --generation real --out bench/results/real --policies fcfs,ssjf,sjf-oracle \
		--batching continuous --loads 0.9 --requests 50 --rounds 3 --recalibrate once \
		--max-batch-size 8 --max-wait-s 0 $(BENCH_STACK_FLAGS)

bench-sim-full: $(STAMP)  ## every simulator study: starvation, SLO throughput, LLMs, traces, workers, sizing (~40 min)
	$(BENCH_SIM) --out bench/results/sim/starvation --loads 0.9 --requests 40000 --rounds 20 \
		--policies fcfs,ssjf:noguard,ssjf:guard=8,ssjf:guard=12,ssjf:guard=20,ssjf:aging=0.7,ssjf:aging=1,ssjf:aging=1.3,ssjf:aging=1.5,hrrn,sjf-oracle \
		--max-wait-s 0 --resamples 500 $(BENCH_SIM_FLAGS)
	$(BENCH_SIM) --out bench/results/sim/slo --policies fcfs,ssjf,ssjf:aging=1.3,sjf-prompt,sjf-oracle \
		--loads 0.9 --requests 4000 --max-wait-s 0 --slo-search --slo-requests 10000 \
		--slo-seeds 2 $(BENCH_SIM_FLAGS)
	for llm in gpt4_0314 llama-2-13b-chat-hf Mistral-7B-Instruct-v0.2; do \
		$(BENCH_SIM) --out bench/results/sim/llm-$$llm --llm $$llm --policies $(BENCH_POLICIES) \
		--loads 0.5,0.9 --requests 20000 --max-wait-s 0 --resamples 500 $(BENCH_SIM_FLAGS) || exit 1; done
	$(BENCH_SIM) --out bench/results/sim/llm-mixed4 \
		--llm vicuna-13b,gpt4_0314,llama-2-13b-chat-hf,Mistral-7B-Instruct-v0.2 \
		--policies $(BENCH_POLICIES) --loads 0.5,0.9 --requests 20000 --max-wait-s 0 \
		--resamples 500 $(BENCH_SIM_FLAGS)
	for a in azure-conversation azure-code; do \
		$(BENCH_SIM) --out bench/results/sim/arrivals-$$a --arrivals $$a --policies $(BENCH_POLICIES) \
		--loads 0.5,0.9 --requests 20000 --max-wait-s 0 --resamples 500 $(BENCH_SIM_FLAGS) || exit 1; \
		$(BENCH_SIM) --out bench/results/sim/lengths-$$a --arrivals $$a --lengths $$a \
		--policies $(BENCH_POLICIES) --loads 0.5,0.9 --requests 20000 --max-wait-s 0 \
		--resamples 500 $(BENCH_SIM_FLAGS) || exit 1; done
	for w in 2 4; do $(BENCH_SIM) --out bench/results/sim/workers-$$w --workers $$w \
		--policies $(BENCH_POLICIES) --loads 0.5,0.9 --requests 20000 --max-wait-s 0 \
		--resamples 500 $(BENCH_SIM_FLAGS) || exit 1; done
	$(BENCH_SIM) --out bench/results/sizing --policies fcfs,ssjf --max-wait-s 0 \
		--size-study 500,1000,2000,4000,8000,16000 $(BENCH_SIM_FLAGS)

bench-predictor: $(STAMP) runs/predictor/comparison.json runs/predictor-shipped/metadata.json runs/predictor-student3/metadata.json  ## formulations x accuracy, latency, throughput, speed levers -> bench/results/predictor*.json
	$(BIN)/python -m services.predictor.bench
	nice -n 10 $(BIN)/python -m services.predictor.levers --candidate runs/predictor-shipped \
		--student runs/predictor-student3

simulate-submit-path: $(STAMP)  ## sync vs async (two-stage) prediction, 1e5 simulated jobs x 3 seeds at load 0.9, vicuna-13b and SmolLM2 -> bench/results/submit_path_sim_<llm>.json
	for llm in vicuna-13b smollm2-135m-instruct; do nice -n 10 $(BIN)/python -m services.predictor.submit_path_sim \
		--requests 100000 --load 0.9 --seeds 3 --prediction-delay-ms 10 --llm $$llm \
		--out bench/results/submit_path_sim_$$llm.json || exit 1; done

bench-predictor-sweep: $(STAMP)  ## quality levers: the shipped recipe with one change each (seed, loss, pooling, head, tail weight, ...), rated by test tau and by the simulated fraction of oracle's gain -> bench/results/predictor_sweep.json (~60-90 min)
	$(BIN)/python -m services.predictor.sweep

bench-predictor-crossval: $(STAMP)  ## the shipped recipe, its seed 1, classification and 10 epochs rated out of fold over all 805 prompts (5 folds): tau with a bootstrap interval, simulated fraction of oracle's gain -> bench/results/predictor_crossval.json (~50 min)
	$(BIN)/python -m services.predictor.crossval shipped classification 10-epochs seed1

bench-predictor-distill: $(STAMP)  ## distillation rated out of fold like bench-predictor-crossval: per fold a ridge probe on the served LLM's state labels Arena's 750 prompts, and the shipped MiniLM recipe trains on the fold's prompts plus those -> bench/results/predictor_distill.json (~60 min)
	$(BIN)/python -m services.predictor.distill

bench-predictor-probe: $(STAMP) runs/predictor-probe/metadata.json  ## the served LLM's own hidden state + a ridge probe, rated out of fold like bench-predictor-crossval (layer chosen inside each fold); the truncated LLM's speed per depth; the probe artifact and the shipped MiniLM timed in turns -> bench/results/predictor_probe.json (~10 min)
	$(BIN)/python -m services.predictor.probe --artifact runs/predictor-probe

predictor-probe: runs/predictor-probe/metadata.json  ## the probe as a servable artifact (SmolLM2's first 20 layers, fp32, ~400 MB, built locally, not committed): serve it with ssjf predictor --artifact runs/predictor-probe (~4 min)

runs/predictor-probe/metadata.json: $(STAMP)
	$(BIN)/ssjf train-probe --out runs/predictor-probe

predictor-distilled: runs/predictor-distilled/metadata.json  ## the shipped MiniLM recipe trained also on Arena's prompts labelled by the probe (distillation; ~20 min): serve it with ssjf predictor --artifact runs/predictor-distilled

runs/teacher-labels/arena_hard_v2/lengths.csv: runs/predictor-probe/metadata.json
	$(BIN)/ssjf teacher-label --teacher runs/predictor-probe --prompts ../shared/data/arena_hard_v2/prompts.jsonl --out runs/teacher-labels/arena_hard_v2

runs/predictor-distilled/metadata.json: runs/teacher-labels/arena_hard_v2/lengths.csv
	$(BIN)/ssjf train-predictor $(PREDICTOR_FLAGS) --labels data/smollm2-135m-instruct/alpaca_eval-greedy,runs/teacher-labels/arena_hard_v2 --name minilm-distilled --out runs/predictor-distilled

bench-scheduler: $(STAMP)  ## dispatch latency, submissions/s, 1e3-1e6 queued vs redis-benchmark -> bench/results/scheduler.json
	$(BIN)/python -m services.scheduler.bench --out bench/results/scheduler.json

bench-streams: $(STAMP)  ## concurrent open streams per scheduler replica -> bench/results/streams.json
	$(BIN)/python -m services.scheduler.stream_bench --streams 1000,5000 --rounds 2 \
		--out bench/results/streams.json

bench-worker: $(STAMP)  ## worker engine: tok/s + step latency per batching mode, prefill cost -> bench/results/worker.json
	$(BIN)/python -m services.worker.bench

images:  ## build the container images, offline if need be (deploy/docker/build-images.sh)
	deploy/docker/build-images.sh ssjf valkey

images-monitoring:  ## build a Prometheus image from Debian's package (offline hosts; Grafana is pull-only)
	deploy/docker/build-images.sh monitoring

stubs:  ## generate Node.js, Go and C++ gRPC stubs from protos/ into clients/gen (not committed)
	clients/generate-stubs.sh

test-compose: $(STAMP)  ## the compose stack end to end in real containers (needs a Docker engine)
	$(MAKE) images
	SSJF_COMPOSE_TEST=1 $(BIN)/python -m pytest -q -rs -s tests/test_compose.py
bench-http: $(STAMP)  ## OpenAI HTTP front: added p50 latency vs gRPC, req/s per front process -> bench/results/http.json
	$(BIN)/python -m services.http.bench --out bench/results/http.json

bench-security: $(STAMP)  ## TLS + tokens vs plaintext: per Submit, per streamed token, per connection -> bench/results/security.json
	$(BIN)/python -m services.scheduler.security_bench --out bench/results/security.json

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
