#!/usr/bin/env bash
# Label SmolLM2-135M-Instruct's own answers through a real local stack (see README.md here).
# Rerunning resumes: each `ssjf collect` skips the prompt ids its --out already holds.
#   LABELS_OUT   where the collect directories go (default: this directory)
#   SHARED_DATA  the shared data (default: ../shared/data beside the checkout)
#   MAX_BATCH    worker batch size (continuous batching), CONCURRENCY prompts in flight
#   WORKERS      worker processes (one torch thread each: 2 on an otherwise idle 2-core box)
#   SAMPLED_SUBSET  prompts of the sampled runs (default 320; a smaller N is the first N of the
#                   same draw, so a later, larger run resumes it)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${LABELS_OUT:-$REPO/data/smollm2-135m-instruct}
SHARED=${SHARED_DATA:-$REPO/../shared/data}
MAX_BATCH=${MAX_BATCH:-16}
CONCURRENCY=${CONCURRENCY:-24}
MAX_NEW_TOKENS=1024
MODEL=smollm2-135m-instruct
SSJF=$REPO/.venv/bin/ssjf
PY=$REPO/.venv/bin/python
# One torch thread: on a shared 2-core machine two threads stall on each other.
export SSJF_TORCH_THREADS=${SSJF_TORCH_THREADS:-1}
PORT=${LABEL_PORT:-$(cd "$REPO" && $PY -c 'from services.common.net import free_port; print(free_port())')}
mkdir -p "$OUT"
echo "$(date -u +%FT%TZ) labelling: stack on port $PORT, batch $MAX_BATCH, out $OUT"
$SSJF up --port "$PORT" --model "$MODEL" --policy fcfs --max-batch-size "$MAX_BATCH" \
  --workers "${WORKERS:-1}" \
  --default-max-new-tokens "$MAX_NEW_TOKENS" &
UP=$!
trap 'kill "$UP" 2>/dev/null; wait "$UP"' EXIT
$SSJF health "127.0.0.1:$PORT" --timeout-s 600 || exit 1

run() {  # run NAME ARGS...: one collect directory, retried while prompts fail
  local name=$1; shift
  for attempt in 1 2 3; do
    echo "$(date -u +%FT%TZ) collect $name (attempt $attempt)"
    $SSJF collect --server "127.0.0.1:$PORT" --out "$OUT/$name" \
      --max-new-tokens "$MAX_NEW_TOKENS" --concurrency "$CONCURRENCY" "$@" && return 0
    kill -0 "$UP" 2>/dev/null || { echo "the stack died"; exit 1; }
  done
}
run alpaca_eval-greedy --prompts "$SHARED/alpaca_eval/prompts.jsonl" --label "$MODEL"
for seed in 1 2; do
  run "alpaca_eval-t0.7-seed$seed" --prompts "$SHARED/alpaca_eval/prompts.jsonl" \
    --subset "${SAMPLED_SUBSET:-320}" --subset-seed 0 --temperature 0.7 --seed "$seed" --label "$MODEL-t0.7-seed$seed"
done
# Shortest first: Arena prompts run to 11,000 tokens, and a left-padded batch pads every
# row to its longest prompt.
run arena_hard_v2-greedy --prompts "$SHARED/arena_hard_v2/prompts.jsonl" --label "$MODEL" --shortest-first
echo "$(date -u +%FT%TZ) labelling complete"
