"""One multiplexed reader of job event streams per scheduler replica.

Every open Generate/Stream call used to hold its own Redis connection blocked in XREAD, so
about 100 open streams emptied redis-py's pool and the replica answered everything else
with UNAVAILABLE. Here one task owns one dedicated connection and blocks in a single
``XREAD BLOCK`` over every stream that has a reader; entries are handed to the readers'
queues. A new reader interrupts the blocked XREAD with ``CLIENT UNBLOCK`` (sent on the
shared pool), so it gets its first entries at once, not after the block timeout.

Open streams then cost a queue and a dict entry each, not a connection: thousands per
replica (measured in ``python -m services.scheduler.stream_bench``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError

from services.common.redis_store import node_client

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]
_READ_COUNT = 512  # entries per stream per XREAD


def _entry_order(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


@dataclass(eq=False)
class Subscription:
    """One reader of one stream: entries after ``cursor`` arrive in ``queue`` in batches; an
    exception in the queue means the hub lost Redis (the reader decides what to do)."""

    stream: str
    cursor: str = "0-0"
    queue: asyncio.Queue[list[Entry] | Exception] = field(default_factory=asyncio.Queue)


class StreamHub:
    """Reads every subscribed stream through one blocking connection (see module doc)."""

    def __init__(self, redis: aioredis.Redis, block_ms: int = 5000) -> None:
        self._shared = redis
        # Its own one-connection client, without retries: the loop reconnects by itself and
        # must learn the new connection's id (for CLIENT UNBLOCK) when it does.
        pool = redis.connection_pool
        kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
        self._reader = aioredis.Redis(
            connection_pool=aioredis.ConnectionPool(
                connection_class=pool.connection_class, max_connections=1, **kwargs
            )
        )
        self._block_ms = block_ms
        self._by_stream: dict[str, set[Subscription]] = {}
        self._changed = asyncio.Event()
        self._client_id: int | None = None
        self._blocked = False
        self._unblock_sent = False
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def open_streams(self) -> int:
        return sum(len(subs) for subs in self._by_stream.values())

    def subscribe(self, stream: str, cursor: str = "0-0") -> Subscription:
        subscription = Subscription(stream, cursor)
        self._by_stream.setdefault(stream, set()).add(subscription)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="stream-hub")
        self._wake()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subs = self._by_stream.get(subscription.stream)
        if subs is not None:
            subs.discard(subscription)
            if not subs:
                del self._by_stream[subscription.stream]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await self._reader.aclose()
        await self._reader.connection_pool.disconnect()

    def _wake(self) -> None:
        """A new reader: interrupt the blocked XREAD so the next one includes its stream."""
        self._changed.set()
        if self._blocked and not self._unblock_sent and self._client_id is not None:
            self._unblock_sent = True
            task = asyncio.create_task(self._unblock(self._client_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _unblock(self, client_id: int) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._shared.execute_command("CLIENT", "UNBLOCK", client_id)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            if not self._by_stream:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                if self._client_id is None:
                    self._client_id = int(await self._reader.execute_command("CLIENT", "ID"))
                streams = {
                    stream: min((s.cursor for s in subs), key=_entry_order)
                    for stream, subs in self._by_stream.items()
                }
                self._changed.clear()
                self._blocked, self._unblock_sent = True, False
                try:
                    reply = await self._reader.xread(
                        streams, count=_READ_COUNT, block=self._block_ms
                    )
                finally:
                    self._blocked = False
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                # Tell readers (each decides: wait on, or end its call as UNAVAILABLE), then
                # reconnect with backoff; their cursors are kept, so nothing is skipped.
                log.warning("stream reader lost redis", extra={"error": str(error)})
                self._client_id = None
                await self._reader.connection_pool.disconnect()
                for subs in self._by_stream.values():
                    for subscription in subs:
                        subscription.queue.put_nowait(error)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(2.0, delay * 2)
                continue
            for stream, entries in reply or []:
                self._deliver(stream, entries)

    def _deliver(self, stream: str, entries: list[Entry]) -> None:
        for subscription in self._by_stream.get(stream, ()):
            after = _entry_order(subscription.cursor)
            new = [entry for entry in entries if _entry_order(entry[0]) > after]
            if new:
                subscription.cursor = new[-1][0]
                subscription.queue.put_nowait(new)


class SlotStreamHubs:
    """StreamHub for Redis Cluster: one multi-key XREAD cannot span slots, so one hub (one
    blocking connection to the slot's master) per slot that has readers. With the
    scheduler's keys, a slot is an LLM queue's tag, so a replica holds one reading
    connection per LLM with open streams. A resharding that moves a slot while readers wait
    shows up as reader errors (the readers check their job and wait on)."""

    def __init__(self, cluster: Any) -> None:
        self._cluster = cluster
        self._hubs: dict[int, StreamHub] = {}

    @property
    def open_streams(self) -> int:
        return sum(hub.open_streams for hub in self._hubs.values())

    def subscribe(self, stream: str, cursor: str = "0-0") -> Subscription:
        slot = key_slot(stream.encode())
        hub = self._hubs.get(slot)
        if hub is None:
            # Connected as the cluster client is (credentials, TLS), to the slot's master.
            client = node_client(self._cluster.get_node_from_key(stream))
            hub = self._hubs[slot] = StreamHub(client)
        return hub.subscribe(stream, cursor)

    def unsubscribe(self, subscription: Subscription) -> None:
        hub = self._hubs.get(key_slot(subscription.stream.encode()))
        if hub is not None:
            hub.unsubscribe(subscription)

    async def close(self) -> None:
        for hub in self._hubs.values():
            await hub.close()
            await hub._shared.aclose()
