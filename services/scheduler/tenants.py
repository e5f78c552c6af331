"""Per-tenant cap on unfinished jobs, shared by every scheduler replica through Redis.

Each tenant with a ``max_queued_jobs`` limit has a sorted set ``ssjf:tenant-jobs:<tenant>``
(keys.py) of its unfinished job ids. A submission reserves a place atomically (one small
script: count, then add) before the job is queued, and gives it back if the job is not
queued after all (deduplicated, queue full, Redis error). Jobs leave the set lazily: when a
tenant is at its limit, the ids whose records are finished or expired are pruned and the
count taken again, so the lifecycle scripts need not know about tenants. The set expires
with the jobs.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from services.common.errors import LIMIT_MAX_QUEUED_JOBS, ResourceExhausted
from services.scheduler.keys import tenant_jobs_key
from services.scheduler.models import JobState
from services.scheduler.store import job_key

# ARGV: limit, member, score, ttl. Returns the count after adding, or -count when full.
_RESERVE = """
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[1]) then return -count end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return count + 1
"""
_FINISHED = {state.value for state in JobState if state.finished}
_IN_FLIGHT_S = 60.0
# Seconds to wait before retrying, said to a tenant at its limit: jobs take seconds.
RETRY_AFTER_S = 2.0


class TenantJobs:
    def __init__(self, redis: aioredis.Redis, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._reserve = redis.register_script(_RESERVE)

    async def reserve(self, tenant: str, job_id: str, limit: int, now: float) -> None:
        """Count ``job_id`` against ``tenant``'s ``limit``; ResourceExhausted when full."""
        key = tenant_jobs_key(tenant)
        args = [limit, job_id, repr(now), self.ttl_s]
        count = await self._reserve(keys=[key], args=args)
        if count < 0:
            await self._prune(key)
            count = await self._reserve(keys=[key], args=args)
        if count < 0:
            raise ResourceExhausted(
                f"tenant {tenant!r} has {-count} unfinished jobs, its limit; retry in "
                f"{RETRY_AFTER_S:.0f} s or when one finishes",
                retry_after_s=RETRY_AFTER_S,
                limit=LIMIT_MAX_QUEUED_JOBS,
            )

    async def release(self, tenant: str, job_id: str) -> None:
        await self.redis.zrem(tenant_jobs_key(tenant), job_id)

    async def count(self, tenant: str) -> int:
        await self._prune(tenant_jobs_key(tenant))
        return await self.redis.zcard(tenant_jobs_key(tenant))

    async def _prune(self, key: str) -> None:
        members = await self.redis.zrange(key, 0, -1, withscores=True)
        if not members:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, _ in members:
                pipe.hget(job_key(job_id), "state")
            states = await pipe.execute()
        # A reservation whose record does not exist yet is a submission in flight on some
        # replica, unless it is old (that replica died between reserving and queueing).
        orphaned_before = time.time() - _IN_FLIGHT_S
        done = [
            job_id
            for (job_id, reserved_at), state in zip(members, states, strict=True)
            if state in _FINISHED or (state is None and reserved_at < orphaned_before)
        ]
        if done:
            await self.redis.zrem(key, *done)
