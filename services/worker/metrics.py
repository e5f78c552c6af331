"""Prometheus metrics of a worker's engine: tokens generated and batch occupancy per step.

Fed by the engine's ``on_step`` hook (one call per forward pass), so the engine itself knows
nothing of Prometheus. Labels: the LLM names the worker serves and its batching mode.

``llm`` is the worker's ``--served-model-name`` list joined with "," (usually one name): a
step batches the jobs of every name the worker serves, so its tokens belong to no single
name, and one series per name would count them twice in a sum. Dashboards filter it with
``llm=~"(.*,)?($llm)(,.*)?"``. There is no ``policy`` label: a lease carries no policy
(``LeasedJob``) and a step batches jobs whatever policy ordered them; the policy is a
scheduler setting, on the scheduler's metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Histogram

from services.worker.engine import StepStat

GENERATED_TOKENS = Counter(
    "ssjf_worker_generated_tokens",
    "Tokens produced by decoding steps (rate(): the worker's tokens/s)",
    ["llm", "batching"],
)
STEP_SECONDS = Histogram(
    "ssjf_worker_step_seconds",
    "Duration of one forward pass, by kind (prefill or decode)",
    ["llm", "batching", "kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
BATCH_OCCUPANCY = Histogram(
    "ssjf_worker_batch_occupancy",
    "Sequences in the batch at each decoding step, as a fraction of --max-batch-size",
    ["llm", "batching"],
    buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
)


def step_observer(
    llms: list[str], batching: str, max_batch_size: int
) -> Callable[[StepStat], None]:
    """An ``Engine(on_step=...)`` callback that records each step under these labels."""
    llm = ",".join(llms)
    tokens = GENERATED_TOKENS.labels(llm, batching)
    occupancy = BATCH_OCCUPANCY.labels(llm, batching)
    seconds = {kind: STEP_SECONDS.labels(llm, batching, kind) for kind in ("prefill", "decode")}

    def observe(step: StepStat) -> None:
        seconds[step.kind].observe(step.seconds)
        if step.kind == "decode":
            tokens.inc(step.tokens)
            occupancy.observe(step.batch_size / max_batch_size)

    return observe
