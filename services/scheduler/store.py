"""The job store: every piece of scheduler state, in Redis, changed by atomic Lua scripts.

Key names and the Redis layout: keys.py (their one definition, shared with the Lua scripts).

Each state change is one script (lua/*.lua, sharing lua/lib.lua), so any number of
scheduler replicas can share one Redis: a job is claimed, renewed, requeued or finished
exactly once whoever races for it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.errors import NotFound, Unavailable
from services.scheduler.keys import (
    LLMS_KEY,
    LLMS_SEEN_KEY,
    WORKERS_KEY,
    arrivals_key,
    events_key,
    idempotency_key,
    job_key,
    lua_prelude,
    metrics_key,
    notify_key,
    queue_key,
    running_key,
    worker_key,
)
from services.scheduler.models import (
    FinishReason,
    JobEnd,
    JobRecord,
    JobState,
    LeasedJob,
    Progress,
    QueueStats,
    SamplingParams,
    Stop,
    StopReason,
    Token,
    messages_from_json,
    messages_to_json,
    scoped_request_id,
)
from services.scheduler.streams import SlotStreamHubs, StreamHub

# Index entries of workers gone this long are pruned (long enough for replicas' clock skew;
# the worker:<id> key's own Redis expiry is what decides liveness).
_WORKER_INDEX_GRACE_S = 60.0
_LUA_DIR = Path(__file__).with_name("lua")
_Method = TypeVar("_Method", bound=Callable[..., Awaitable[Any]])
_Item = TypeVar("_Item")
_RELIST_S = 5.0


@dataclass(frozen=True)
class StoreSettings:
    job_ttl_s: int  # finished records, streams and idempotency keys expire after this
    lease_ttl_s: float  # a lease not renewed within this is expired
    max_attempts: int  # leases a job may get before a lost lease fails it
    completions_maxlen: int  # approximate cap of each LLM's completions stream (keys.py)
    reap_batch: int = 256  # expired leases handled per reaper script call


def _time_arg(now: float | None) -> str:
    """A script's time argument: '' makes the script read Redis's own clock."""
    return "" if now is None else repr(now)


class KeyReused(Exception):
    """The client_request_id belongs to an earlier job with a different request."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class Rejected(Exception):
    """The queue was full; ``depth`` is what it held."""

    def __init__(self, depth: int) -> None:
        super().__init__(depth)
        self.depth = depth


_STOP_FOR_STATUS = {
    "cancelled": StopReason.CANCELLED,
    "finished": StopReason.FINISHED,
    "gap": StopReason.FINISHED,
    "lost": StopReason.LEASE_LOST,
}


def _unavailable_without_redis(method: _Method) -> _Method:
    """Report a lost Redis connection as the domain's Unavailable (gRPC UNAVAILABLE: retry),
    not as an unexpected error."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise Unavailable(f"Redis is unreachable ({error}); retry shortly") from error

    return wrapper  # type: ignore[return-value]


class BatchedScript:
    """One Lua script whose concurrent calls share pipelined round trips.

    Each call names one key of the slot its keys live in (``route``): a Redis Cluster client
    sends the script to that slot's master; a single Redis ignores it.

    A call made while no round trip is in flight goes at once, by itself; calls made while
    one is in flight queue up and go together in the next one. Under load, one send and one
    read carry dozens of scripts (each still atomic on its own: Redis runs every script to
    completion before the next), so batching changes no outcome, only syscalls per call.
    """

    def __init__(self, redis: aioredis.Redis, name: str) -> None:
        library = lua_prelude() + (_LUA_DIR / "lib.lua").read_text()
        self._redis = redis
        self._script = redis.register_script(
            library + "\n" + (_LUA_DIR / f"{name}.lua").read_text()
        )
        self._busy = False  # a round trip is in flight
        self._pending: list[tuple[tuple[str, list[Any]], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, route: str, args: list[Any]) -> Any:
        if self._busy:
            future = asyncio.get_running_loop().create_future()
            self._pending.append(((route, args), future))
            return await future
        self._busy = True
        try:
            [reply] = await self.run_many([(route, args)])
        finally:
            self._next_round_trip()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _next_round_trip(self) -> None:
        if self._pending:
            self._flusher = asyncio.create_task(self._flush())  # stays busy
        else:
            self._busy = False
            self._flusher = None

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            replies = await self.run_many([call for call, _ in batch])
        except Exception as error:  # handed to every caller of the batch
            replies = [error] * len(batch)
        finally:
            self._next_round_trip()
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue  # the caller was cancelled
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def run_many(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Run the script once per (route, arguments), in one pipelined round trip; a failed
        call gives its exception in place of its reply."""
        if len(calls) == 1:
            route, args = calls[0]
            try:
                return [await self._script(keys=[route], args=args)]
            except ResponseError as error:
                return [error]
        if isinstance(self._redis, RedisCluster):
            # A cluster pipeline refuses EVALSHA: concurrent calls, each to its slot's master.
            return await asyncio.gather(
                *(self._script(keys=[route], args=args) for route, args in calls),
                return_exceptions=True,
            )
        async with self._redis.pipeline(transaction=False) as pipe:
            for route, args in calls:
                pipe.evalsha(self._script.sha, 1, route, *args)
            replies = await pipe.execute(raise_on_error=False)
        if any(isinstance(reply, NoScriptError) for reply in replies):
            # Redis restarted or flushed its script cache: run these again (Script loads it).
            replies = [
                await self._script(keys=[route], args=args)
                if isinstance(reply, NoScriptError)
                else reply
                for (route, args), reply in zip(calls, replies, strict=True)
            ]
        return replies


def _record_json(record: JobRecord, deadline_at: float) -> str:
    """The record's hash fields as one JSON object of strings (Lua's cjson would round
    numbers to 14 digits: strings keep every digit of a timestamp)."""
    return json.dumps(
        {
            "job_id": record.job_id,
            "client_request_id": record.client_request_id,
            "llm": record.llm,
            "state": record.state.value,
            "priority": str(record.priority),
            "predicted_output_tokens": repr(record.predicted_output_tokens),
            "prediction_fallback": "1" if record.prediction_fallback else "0",
            "predictor_version": record.predictor_version,
            "policy": record.policy,
            "score": repr(record.score),
            "sampling": record.sampling.to_json(),
            "prompt": record.prompt,
            "messages": messages_to_json(record.messages),
            "submitted_at": repr(record.submitted_at),
            "queued_at": repr(record.queued_at),
            "leased_at": "0",
            "first_token_at": "0",
            "finished_at": "0",
            "worker_id": "",
            "attempts": "0",
            "generated_tokens": "0",
            "next_index": "0",
            "finish_reason": "",
            "error": "",
            "deadline_at": repr(deadline_at),
            "request_hash": record.request_hash,
            "lease_id": "",
            "lease_expires_at": "0",
            "tenant": record.tenant,
        },
        ensure_ascii=False,
    )


def _parse_record(fields: dict[str, str]) -> JobRecord:
    return JobRecord(
        job_id=fields["job_id"],
        client_request_id=fields["client_request_id"],
        llm=fields["llm"],
        state=JobState(fields["state"]),
        priority=int(fields["priority"]),
        predicted_output_tokens=float(fields["predicted_output_tokens"]),
        prediction_fallback=fields["prediction_fallback"] == "1",
        predictor_version=fields["predictor_version"],
        policy=fields["policy"],
        score=float(fields["score"]),
        sampling=SamplingParams.from_json(fields["sampling"]),
        prompt=fields["prompt"],
        submitted_at=float(fields["submitted_at"]),
        queued_at=float(fields["queued_at"]),
        leased_at=float(fields["leased_at"]),
        first_token_at=float(fields["first_token_at"]),
        finished_at=float(fields["finished_at"]),
        worker_id=fields["worker_id"],
        attempts=int(fields["attempts"]),
        generated_tokens=int(fields["generated_tokens"]),
        finish_reason=FinishReason(fields["finish_reason"]),
        error=fields["error"],
        request_hash=fields.get("request_hash", ""),
        messages=messages_from_json(fields.get("messages")),
        prompt_tokens=int(fields.get("prompt_tokens") or 0),
        tenant=fields.get("tenant", ""),
    )


def _submit_args(record: JobRecord, deadline_at: float, max_queue_depth: int) -> list:
    return [
        record.job_id,
        scoped_request_id(record.tenant, record.client_request_id),
        record.llm,
        repr(record.score),
        repr(record.submitted_at),
        repr(deadline_at),
        max_queue_depth,
        int(record.prediction_fallback),
        _record_json(record, deadline_at),
        record.request_hash,
    ]


def _submit_result(reply: list[str]) -> tuple[str, bool]:
    status, value = reply
    if status == "full":
        raise Rejected(int(value))
    if status == "conflict":
        raise KeyReused(value)
    return value, status == "dup"


class JobStore:
    """Jobs, queues and leases in Redis; every method is one or two round trips."""

    def __init__(self, redis: aioredis.Redis, settings: StoreSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._submit = BatchedScript(redis, "submit")
        self._claim = BatchedScript(redis, "claim")
        self._progress = BatchedScript(redis, "progress")
        self._cancel = BatchedScript(redis, "cancel")
        self._reap = BatchedScript(redis, "reap")
        # Redis Cluster: calls whose keys live in different slots go as separate scripts.
        self._cluster = isinstance(redis, RedisCluster)
        # LLM -> when this process last added it to LLMS_KEY (re-added every few seconds, so
        # a Redis that lost the set, e.g. restarted without persistence, gets it back).
        self._listed_llms: dict[str, float] = {}
        self._release = BatchedScript(redis, "release")
        # One multiplexed XREAD per replica (per slot on a cluster) serves every open stream.
        self.hub: StreamHub | SlotStreamHubs = (
            SlotStreamHubs(redis) if self._cluster else StreamHub(redis)
        )
        self._clock_offset = 0.0

    def _by_slot(self, items: list[_Item], key: Callable[[_Item], str]) -> list[list[_Item]]:
        """``items`` grouped by the cluster slot of ``key(item)``, in first-seen order; one
        group on a single Redis (where every key is in reach of one script)."""
        if not self._cluster:
            return [items] if items else []
        groups: dict[int, list[_Item]] = {}
        for item in items:
            groups.setdefault(key_slot(key(item).encode()), []).append(item)
        return list(groups.values())

    async def _list_llms(self, llms: list[str]) -> None:
        """Add LLM names to LLMS_KEY (a global key: kept out of the per-LLM-slot scripts);
        at most once per LLM every _RELIST_S per process, so submits rarely pay for it."""
        now = time.monotonic()
        due = [llm for llm in llms if now - self._listed_llms.get(llm, -_RELIST_S) >= _RELIST_S]
        if not due:
            return
        # Marked before the round trip: concurrent submits do not all send the same SADD.
        self._listed_llms.update(dict.fromkeys(due, now))
        try:
            await self.redis.sadd(LLMS_KEY, *due)
        except BaseException:
            for llm in due:
                self._listed_llms.pop(llm, None)
            raise

    @_unavailable_without_redis
    async def submit(
        self, record: JobRecord, *, deadline_at: float, max_queue_depth: int
    ) -> tuple[str, bool]:
        """Queue ``record`` at its score. Returns (job_id, deduplicated): an earlier job's id
        when its client_request_id was seen. Raises Rejected when the queue is full."""
        await self._list_llms([record.llm])
        reply = await self._submit(
            queue_key(record.llm), _submit_args(record, deadline_at, max_queue_depth)
        )
        return _submit_result(reply)

    @_unavailable_without_redis
    async def submit_many(
        self, records: list[JobRecord], *, max_queue_depth: int
    ) -> list[tuple[str, bool] | Exception]:
        """``submit`` for many jobs in one pipelined round trip (bulk loads, benchmarks);
        each job is still its own atomic script. No start deadlines. A full queue gives a
        Rejected in that job's place."""
        await self._list_llms(sorted({record.llm for record in records}))
        replies = await self._submit.run_many(
            [
                (queue_key(record.llm), _submit_args(record, 0.0, max_queue_depth))
                for record in records
            ]
        )
        results: list[tuple[str, bool] | Exception] = []
        for reply in replies:
            try:
                results.append(reply if isinstance(reply, Exception) else _submit_result(reply))
            except (Rejected, KeyReused) as refused:
                results.append(refused)
        return results

    @_unavailable_without_redis
    async def job_for_client_id(self, llm: str, client_request_id: str) -> str | None:
        return await self.redis.get(idempotency_key(llm, client_request_id))

    @_unavailable_without_redis
    async def get(self, job_id: str) -> JobRecord | None:
        fields = await self.redis.hgetall(job_key(job_id))
        return _parse_record(fields) if fields else None

    @_unavailable_without_redis
    async def claim(
        self,
        worker_id: str,
        llms: list[str],
        *,
        max_jobs: int,
        now: float | None = None,
        max_wait_s: float,
    ) -> list[LeasedJob]:
        """Atomically lease up to ``max_jobs`` of the best queued jobs of ``llms``.

        On Redis Cluster, LLMs whose queues live on different slots are claimed one slot
        after the other (best-first within each, starting at a random one)."""
        lease_prefix = secrets.token_hex(6)
        groups = self._by_slot(llms, queue_key)
        start = secrets.randbelow(len(groups)) if len(groups) > 1 else 0
        rows: list[list[Any]] = []
        for number, group in enumerate(groups[start:] + groups[:start]):
            if len(rows) >= max_jobs:
                break
            rows += await self._claim(
                queue_key(group[0]),
                [
                    worker_id,
                    f"{lease_prefix}{number or ''}",
                    _time_arg(now),
                    self.settings.lease_ttl_s,
                    max_jobs - len(rows),
                    max_wait_s,
                    self.settings.job_ttl_s,
                    *group,
                ],
            )
        resumed = [row[0] for row in rows if int(row[7]) > 0]
        resume_ids = await self._token_ids(resumed) if resumed else {}
        return [
            LeasedJob(
                job_id=job_id,
                lease_id=lease_id,
                llm=llm,
                prompt=prompt,
                sampling=SamplingParams.from_json(sampling),
                attempt=int(attempt),
                predicted_output_tokens=float(predicted),
                resume_token_ids=resume_ids.get(job_id, []),
                messages=messages_from_json(messages),
            )
            for job_id, lease_id, attempt, llm, prompt, sampling, predicted, _, messages in rows
        ]

    async def _token_ids(self, job_ids: list[str]) -> dict[str, list[int]]:
        """Token ids already streamed for each job (what a resuming worker must skip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.xrange(events_key(job_id))
            streams = await pipe.execute()
        token_ids: dict[str, list[int]] = {}
        for job_id, entries in zip(job_ids, streams, strict=True):
            ids: list[int] = []
            for _, fields in entries:
                if fields["k"] == "tokens":
                    ids += [int(token_id) for token_id in fields["ids"].split(",")]
            token_ids[job_id] = ids
        return token_ids

    @_unavailable_without_redis
    async def release(self, leases: list[LeasedJob]) -> int:
        """Give back leases their worker never received (its Lease call was cancelled after
        the claim): the jobs are queued again, their attempts not counted."""
        if not leases:
            return 0
        groups = self._by_slot(leases, lambda job: job_key(job.job_id))
        released = await asyncio.gather(
            *(
                self._release(
                    job_key(group[0].job_id),
                    [value for job in group for value in (job.job_id, job.lease_id)],
                )
                for group in groups
            )
        )
        return sum(released)

    @_unavailable_without_redis
    async def sync_clock(self) -> float:
        """Measure this replica's clock against Redis's; ``now`` then reads Redis's clock
        without a round trip (submission times and aging agree with the scripts' clock)."""
        before = time.time()
        seconds, microseconds = await self.redis.time()
        after = time.time()
        self._clock_offset = seconds + microseconds / 1e6 - (before + after) / 2
        return self._clock_offset

    def now(self) -> float:
        """Redis's clock, as last measured by ``sync_clock`` (this replica's before that)."""
        return time.time() + self._clock_offset

    @_unavailable_without_redis
    async def wait_for_work(self, llms: list[str], timeout_s: float) -> bool:
        """Block until a job is queued for one of ``llms`` (True) or the timeout (False).

        A wake-up may be stale (another worker took the job): callers claim and wait again.
        """
        # Redis reads a timeout that rounds to 0 ms as "block forever": never send one.
        groups = self._by_slot(llms, notify_key)
        # On a cluster one BLPOP cannot span slots: wait on each slot's lists in turn.
        timeout = max(0.001, round(timeout_s / len(groups), 3))
        for group in groups:
            if await self.redis.blpop([notify_key(llm) for llm in group], timeout=timeout):
                return True
        return False

    @_unavailable_without_redis
    async def apply_progress(
        self, progress: list[Progress], now: float | None = None
    ) -> list[Stop]:
        """Apply a worker report; returns the jobs the worker must stop."""
        if not progress:
            return []
        groups = self._by_slot(progress, lambda item: job_key(item.job_id))
        replies = await asyncio.gather(
            *(
                self._progress(job_key(group[0].job_id), self._progress_args(group, now))
                for group in groups
            )
        )
        status_of: dict[int, str] = {}
        for group, reply in zip(groups, replies, strict=True):
            status_of.update({id(item): status for item, status in zip(group, reply, strict=True)})
        return [
            Stop(item.job_id, _STOP_FOR_STATUS[status_of[id(item)]], item.lease_id)
            for item in progress
            if status_of[id(item)] in _STOP_FOR_STATUS
        ]

    def _progress_args(self, progress: list[Progress], now: float) -> list[str | int | float]:
        args: list[str | int | float] = [
            _time_arg(now),
            self.settings.lease_ttl_s,
            self.settings.job_ttl_s,
            self.settings.completions_maxlen,
        ]
        for item in progress:
            tokens = item.tokens
            outcome = item.outcome
            args += [
                item.job_id,
                item.lease_id,
                tokens[0].index if tokens else 0,
                len(tokens),
                ",".join(str(token.token_id) for token in tokens),
                json.dumps([token.text for token in tokens], ensure_ascii=False),
            ]
            if outcome is None:
                args += ["", "", 0, 0, 0]
            else:
                args += [
                    outcome.finish_reason.value or FinishReason.ERROR.value,
                    outcome.error,
                    outcome.prompt_tokens,
                    repr(outcome.prefill_s),
                    repr(outcome.decode_s),
                ]
        return args

    @_unavailable_without_redis
    async def cancel(self, job_id: str, now: float | None = None) -> tuple[JobState, bool] | None:
        """Cancel a live job. Returns (state after, cancelled by this call), None if unknown."""
        reply = await self._cancel(
            job_key(job_id), [job_id, _time_arg(now), self.settings.job_ttl_s]
        )
        if not reply:
            return None
        return JobState(reply[0]), reply[1] == 1

    @_unavailable_without_redis
    async def reap(self, now: float | None = None) -> tuple[int, int, int]:
        """Requeue or fail jobs whose lease expired; fail queued jobs past their deadline.
        Returns (requeued, failed, deadline_missed). One script per LLM (one slot each)."""
        llms = sorted(await self.redis.smembers(LLMS_KEY))
        if not llms:
            return 0, 0, 0
        args = [_time_arg(now), self.settings.max_attempts, self.settings.job_ttl_s]
        replies = await self._reap.run_many(
            [(queue_key(llm), [*args, self.settings.reap_batch, llm]) for llm in llms]
        )
        totals = [0, 0, 0]
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            totals = [total + count for total, count in zip(totals, reply, strict=True)]
        return totals[0], totals[1], totals[2]

    async def events(
        self, job_id: str, from_index: int, block_ms: int = 5000
    ) -> AsyncIterator[Token | JobEnd]:
        """A job's tokens from ``from_index``, stored ones first, then live ones as workers
        report them (from any replica), then its JobEnd. Read through the replica's one
        multiplexed reader (streams.py), so an open stream holds no Redis connection.
        Raises NotFound if the record expires before its end."""
        subscription = self.hub.subscribe(events_key(job_id))
        try:
            while True:
                try:
                    batch = await asyncio.wait_for(subscription.queue.get(), block_ms / 1e3)
                except TimeoutError:
                    batch = []
                if isinstance(batch, Exception) or not batch:
                    # Quiet, or the reader lost Redis: is the job still there? (Raises
                    # Unavailable once Redis stays unreachable past the client's retries.)
                    if not await self._exists(job_id):
                        raise NotFound(
                            f"job {job_id!r} expired before its end (--job-ttl-s); "
                            "its answer is gone"
                        )
                    continue
                for _entry_id, fields in batch:
                    if fields["k"] == "end":
                        record = await self.get(job_id)
                        if record is None:
                            raise NotFound(f"job {job_id!r} expired (--job-ttl-s)")
                        yield JobEnd(record)
                        return
                    first = int(fields["i"])
                    texts = json.loads(fields["t"])
                    for offset, (token_id, text) in enumerate(
                        zip(fields["ids"].split(","), texts, strict=True)
                    ):
                        if first + offset >= from_index:
                            yield Token(first + offset, text, int(token_id))
        finally:
            self.hub.unsubscribe(subscription)

    async def _exists(self, job_id: str) -> bool:
        try:
            return bool(await self.redis.exists(job_key(job_id)))
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise Unavailable(
                f"Redis is unreachable ({error}); resume with Stream(job_id, from_index)"
            ) from error

    async def close(self) -> None:
        await self.hub.close()

    @_unavailable_without_redis
    async def stats(self, llms: list[str], now: float) -> list[QueueStats]:
        """Depth, running count, oldest wait and counters per LLM (every known LLM if none)."""
        names = llms or sorted(await self.redis.smembers(LLMS_KEY))
        async with self.redis.pipeline(transaction=False) as pipe:
            for llm in names:
                pipe.zcard(queue_key(llm))
                pipe.scard(running_key(llm))
                pipe.zrange(arrivals_key(llm), 0, 0, withscores=True)
                pipe.hgetall(metrics_key(llm))
            replies = await pipe.execute()
        stats = []
        for position, llm in enumerate(names):
            queued, running, oldest, counters = replies[4 * position : 4 * position + 4]
            stats.append(
                QueueStats(
                    llm=llm,
                    queued=queued,
                    running=running,
                    oldest_wait_s=max(0.0, now - oldest[0][1]) if oldest else 0.0,
                    counters={name: int(value) for name, value in counters.items()},
                )
            )
        return stats

    # Live-worker registry (see services/scheduler/registry.py) -----------------------------

    @_unavailable_without_redis
    async def register_worker(
        self, worker_id: str, llms: list[str], ttl_s: float, now: float
    ) -> None:
        """Record that ``worker_id`` serves ``llms`` for the next ``ttl_s`` seconds."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(worker_key(worker_id), json.dumps(llms), px=max(1, int(ttl_s * 1e3)))
            pipe.zadd(WORKERS_KEY, {worker_id: now + ttl_s})
            pipe.zadd(LLMS_SEEN_KEY, dict.fromkeys(llms, now))
            await pipe.execute()

    @_unavailable_without_redis
    async def refresh_worker(self, worker_id: str, ttl_s: float, now: float) -> bool:
        """Extend a live registration to ``ttl_s`` from now; False when there is none (the
        worker registers again with its next Lease)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.pexpire(worker_key(worker_id), max(1, int(ttl_s * 1e3)))
            pipe.zadd(WORKERS_KEY, {worker_id: now + ttl_s}, xx=True, gt=True)
            extended, _ = await pipe.execute()
        return bool(extended)

    @_unavailable_without_redis
    async def live_workers(self, now: float) -> dict[str, list[str]]:
        """Each live worker's LLM names."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - _WORKER_INDEX_GRACE_S)
            pipe.zrange(WORKERS_KEY, 0, -1)
            _, worker_ids = await pipe.execute()
        if not worker_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in worker_ids:
                pipe.get(worker_key(worker_id))
            registrations = await pipe.execute()
        return {
            worker_id: json.loads(llms)
            for worker_id, llms in zip(worker_ids, registrations, strict=True)
            if llms is not None
        }

    @_unavailable_without_redis
    async def llms_seen(self, since: float) -> list[str]:
        """LLM names some worker registered at or after ``since``."""
        return await self.redis.zrangebyscore(LLMS_SEEN_KEY, since, "+inf")
