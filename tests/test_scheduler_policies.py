"""Scheduling policies, the in-memory reference queue, and the Redis claim script's order."""

from __future__ import annotations

import asyncio
import random

import pytest

from services.common.errors import InvalidArgument
from services.common.redis_store import connect
from services.scheduler.models import JobRecord, JobState, SamplingParams
from services.scheduler.policies import (
    EPOCH_S,
    POLICIES,
    JobFeatures,
    ReferenceQueue,
    make_policy,
)
from services.scheduler.store import JobStore, StoreSettings

NOW = EPOCH_S + 3e8  # about 2033


def order(policy_name: str, jobs: dict[str, JobFeatures], aging_rate: float = 0.0) -> list[str]:
    policy = make_policy(policy_name, aging_rate)
    return sorted(jobs, key=lambda job_id: (policy.score(jobs[job_id]), job_id))


def test_registry_holds_the_four_policies() -> None:
    assert set(POLICIES) == {"fcfs", "ssjf", "sjf-oracle", "sjf-prompt"}
    with pytest.raises(InvalidArgument, match="unknown policy"):
        make_policy("lifo")
    with pytest.raises(InvalidArgument, match="aging rate"):
        make_policy("ssjf", aging_rate=-1)


def test_fcfs_serves_in_arrival_order_whatever_the_length() -> None:
    jobs = {
        "a": JobFeatures(arrival_s=NOW, predicted_tokens=900),
        "b": JobFeatures(arrival_s=NOW + 1, predicted_tokens=5),
    }
    assert order("fcfs", jobs) == ["a", "b"]


def test_ssjf_serves_shortest_prediction_and_oracle_the_true_length() -> None:
    jobs = {
        "a": JobFeatures(arrival_s=NOW, predicted_tokens=900, oracle_tokens=10),
        "b": JobFeatures(arrival_s=NOW + 1, predicted_tokens=5, oracle_tokens=800),
    }
    assert order("ssjf", jobs) == ["b", "a"]
    assert order("sjf-oracle", jobs) == ["a", "b"]


def test_sjf_prompt_serves_the_shortest_prompt_whatever_the_prediction() -> None:
    jobs = {
        "long-prompt": JobFeatures(arrival_s=NOW, predicted_tokens=5, prompt_chars=900),
        "short-prompt": JobFeatures(arrival_s=NOW + 1, predicted_tokens=900, prompt_chars=12),
    }
    assert order("sjf-prompt", jobs) == ["short-prompt", "long-prompt"]
    # Equal prompts: job id order (the scheduler's time-ordered ids make it first come first
    # served).
    same = {
        "b": JobFeatures(arrival_s=NOW, prompt_chars=40),
        "a": JobFeatures(arrival_s=NOW + 1, prompt_chars=40),
    }
    assert order("sjf-prompt", same) == sorted(same)


def test_aging_lets_a_long_waiting_job_overtake_a_fresh_short_one() -> None:
    jobs = {
        "old-long": JobFeatures(arrival_s=NOW, predicted_tokens=500),
        "new-short": JobFeatures(arrival_s=NOW + 400, predicted_tokens=120),
    }
    assert order("ssjf", jobs, aging_rate=0.0) == ["new-short", "old-long"]
    # Credit after 400 s at 1 token/s: 500 - 400 = 100 < 120.
    assert order("ssjf", jobs, aging_rate=1.0) == ["old-long", "new-short"]


def test_static_aged_score_orders_like_the_dynamic_formula() -> None:
    rng = random.Random(3)
    rate = 0.7
    jobs = {
        f"j{i}": JobFeatures(
            arrival_s=NOW + rng.uniform(0, 1000), predicted_tokens=rng.uniform(1, 2000)
        )
        for i in range(200)
    }
    now = NOW + 1500
    dynamic = sorted(
        jobs, key=lambda j: jobs[j].predicted_tokens - rate * (now - jobs[j].arrival_s)
    )
    assert order("ssjf", jobs, aging_rate=rate) == dynamic


def test_priority_class_dominates_length_and_age() -> None:
    jobs = {
        "urgent-long-new": JobFeatures(arrival_s=NOW + 3e7, predicted_tokens=1e6, priority=-1),
        "normal-short-old": JobFeatures(arrival_s=NOW, predicted_tokens=1, priority=0),
        "background": JobFeatures(arrival_s=NOW - 3e8, predicted_tokens=0, priority=100),
    }
    for name in POLICIES:
        assert order(name, jobs, aging_rate=10.0) == [
            "urgent-long-new",
            "normal-short-old",
            "background",
        ], name


def test_reference_queue_max_wait_guard_serves_the_oldest_first() -> None:
    queue = ReferenceQueue(make_policy("ssjf"), max_wait_s=60)
    queue.push("long", JobFeatures(arrival_s=NOW, predicted_tokens=1000))
    queue.push("short", JobFeatures(arrival_s=NOW + 10, predicted_tokens=10))
    queue.push("shorter", JobFeatures(arrival_s=NOW + 20, predicted_tokens=5))
    assert queue.pop(NOW + 30) == "shorter"  # nobody waited 60 s yet
    assert queue.pop(NOW + 61) == "long"  # waited 61 s > 60 s: goes first
    assert queue.pop(NOW + 62) == "short"
    assert queue.pop(NOW + 63) is None


def test_reference_queue_remove_and_repush() -> None:
    queue = ReferenceQueue(make_policy("ssjf"))
    queue.push("a", JobFeatures(arrival_s=NOW, predicted_tokens=10))
    queue.push("b", JobFeatures(arrival_s=NOW, predicted_tokens=20))
    assert queue.remove("a") and not queue.remove("a")
    queue.push("a", JobFeatures(arrival_s=NOW, predicted_tokens=30))
    assert len(queue) == 2
    assert [queue.pop(NOW), queue.pop(NOW), queue.pop(NOW)] == ["b", "a", None]


def _record(job_id: str, score: float, arrival: float, priority: int) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        client_request_id="",
        llm="m",
        state=JobState.QUEUED,
        priority=priority,
        predicted_output_tokens=0.0,
        prediction_fallback=False,
        predictor_version="",
        policy="ssjf",
        score=score,
        sampling=SamplingParams(),
        prompt="p",
        submitted_at=arrival,
        queued_at=arrival,
    )


@pytest.mark.parametrize("policy_name", ["ssjf", "fcfs"])
def test_redis_claim_order_equals_reference_queue(redis_url: str, policy_name: str) -> None:
    """Random arrivals, ties, priorities and pops of 1-3 jobs: lua/claim.lua and
    ReferenceQueue hand out the same jobs in the same order."""

    async def scenario() -> tuple[list[str], list[str]]:
        redis = connect(redis_url)
        store = JobStore(
            redis,
            StoreSettings(job_ttl_s=60, lease_ttl_s=600, max_attempts=3, completions_maxlen=10),
        )
        policy = make_policy(policy_name, aging_rate=0.5)
        reference = ReferenceQueue(policy, max_wait_s=40.0)
        rng = random.Random(11)
        clock = NOW
        served_redis: list[str] = []
        served_reference: list[str] = []
        for step in range(600):
            if rng.random() < 0.55:
                features = JobFeatures(
                    arrival_s=clock,
                    predicted_tokens=rng.choice([5.0, 50.0, 50.0, rng.uniform(1, 500)]),
                    priority=rng.choice([0, 0, 0, 1, -1]),
                )
                job_id = f"{int(clock * 1e6):016x}{step:06d}"
                score = reference.push(job_id, features)
                await store.submit(
                    _record(job_id, score, clock, features.priority),
                    deadline_at=0.0,
                    max_queue_depth=0,
                )
            else:
                count = rng.choice([1, 1, 3])
                leased = await store.claim("w", ["m"], max_jobs=count, now=clock, max_wait_s=40.0)
                served_redis += [job.job_id for job in leased]
                for _ in range(count):
                    job_id = reference.pop(clock)
                    if job_id is not None:
                        served_reference.append(job_id)
            if rng.random() < 0.7:
                clock += rng.expovariate(0.5)  # else: the next job arrives at the same time
        while leased := await store.claim("w", ["m"], max_jobs=5, now=clock, max_wait_s=40.0):
            served_redis += [job.job_id for job in leased]
        while (job_id := reference.pop(clock)) is not None:
            served_reference.append(job_id)
        await redis.aclose()
        return served_redis, served_reference

    served_redis, served_reference = asyncio.run(scenario())
    assert len(served_redis) > 250
    assert served_redis == served_reference
