"""JobStore on a real Redis: batched scripts under concurrency, and script-cache loss."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from services.common.redis_store import connect
from services.scheduler.core import new_job_id
from services.scheduler.keys import arrivals_key, metrics_key, queue_key
from services.scheduler.models import FinishReason, JobRecord, JobState, SamplingParams
from services.scheduler.store import JobStore, Rejected, StoreSettings

SETTINGS = StoreSettings(job_ttl_s=60, lease_ttl_s=60, max_attempts=3, completions_maxlen=10)


def _record(index: int) -> JobRecord:
    now = time.time()
    return JobRecord(
        job_id=new_job_id("m"), client_request_id=f"client-{index % 40}", llm="m",
        state=JobState.QUEUED, priority=0, predicted_output_tokens=float(index),
        prediction_fallback=False, predictor_version="", policy="ssjf", score=float(index),
        sampling=SamplingParams(), prompt=f"prompt {index}", submitted_at=now, queued_at=now,
        leased_at=0.0, first_token_at=0.0, finished_at=0.0, worker_id="", attempts=0,
        generated_tokens=0, finish_reason=FinishReason.UNSPECIFIED, error="",
    )  # fmt: skip


async def _submit(store: JobStore, record: JobRecord, depth: int) -> tuple[str, bool] | str:
    try:
        return await store.submit(record, deadline_at=0.0, max_queue_depth=depth)
    except Rejected:
        return "rejected"


def test_concurrent_submits_keep_depth_and_idempotency_exact(redis_url: str) -> None:
    """80 concurrent submits (batched into shared round trips), 40 distinct client ids, a
    queue capped at 25: 25 new jobs exactly, every duplicate maps to its first job."""

    async def scenario() -> list[tuple[str, bool] | str]:
        redis = connect(redis_url)
        store = JobStore(redis, SETTINGS)
        results = await asyncio.gather(*(_submit(store, _record(i), 25) for i in range(80)))
        assert await redis.zcard(queue_key("m")) == 25
        await redis.aclose()
        return list(results)

    results = asyncio.run(scenario())
    created = [r for r in results if r != "rejected" and not r[1]]
    assert len(created) == 25
    first_job = {}
    for index, result in enumerate(results):
        if result != "rejected" and not result[1]:
            first_job[index % 40] = result[0]
    for index, result in enumerate(results):
        if result != "rejected" and result[1]:
            assert result[0] == first_job[index % 40]


def test_scripts_reload_after_redis_forgets_them(redis_url: str) -> None:
    async def scenario() -> None:
        redis = connect(redis_url)
        store = JobStore(redis, SETTINGS)
        await store.submit(_record(0), deadline_at=0.0, max_queue_depth=0)
        await redis.script_flush()
        alone = await store.submit(_record(1), deadline_at=0.0, max_queue_depth=0)
        await redis.script_flush()
        together = await asyncio.gather(
            *(store.submit(_record(i), deadline_at=0.0, max_queue_depth=0) for i in range(2, 12))
        )
        assert not alone[1] and all(not dedup for _, dedup in together)
        leased = await store.claim("w", ["m"], max_jobs=20, now=time.time(), max_wait_s=0)
        assert len(leased) == 12
        await redis.aclose()

    asyncio.run(scenario())


def test_a_repeated_submit_changes_nothing(redis_url: str) -> None:
    """A submit whose reply was lost is sent again (redis-py retries on a new connection):
    the repeat answers as the first call did, counts nothing twice, and does not queue
    again a job a worker claimed in between (it would be dispatched twice)."""

    async def scenario() -> None:
        redis = connect(redis_url)
        store = JobStore(redis, SETTINGS)
        # Without a client id nothing else catches the repeat; with one it must still answer
        # "queued", not "deduplicated" (the caller made one request, not two).
        claimed, waiting = replace(_record(0), client_request_id=""), _record(1)
        for record in (claimed, waiting):
            first = await store.submit(record, deadline_at=0.0, max_queue_depth=0)
            assert first == (record.job_id, False)
        [lease] = await store.claim("w", ["m"], max_jobs=1, now=time.time(), max_wait_s=0)
        assert lease.job_id == claimed.job_id  # the lower score
        for record in (claimed, waiting):
            again = await store.submit(record, deadline_at=0.0, max_queue_depth=0)
            assert again == (record.job_id, False), record.client_request_id
        assert await redis.hget(metrics_key("m"), "submitted") == "2"
        assert await redis.zrange(queue_key("m"), 0, -1) == [waiting.job_id]
        assert await redis.zrange(arrivals_key("m"), 0, -1) == [waiting.job_id]
        leased = await store.get(claimed.job_id)
        assert leased is not None and leased.state is JobState.LEASED
        # Only the job that was never claimed is left to lease.
        rest = await store.claim("w", ["m"], max_jobs=2, now=time.time(), max_wait_s=0)
        assert [lease.job_id for lease in rest] == [waiting.job_id]
        await redis.aclose()

    asyncio.run(scenario())
