"""Fixtures shared by every test: a real Redis server of the tests' own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.redis_server import RedisServerProcess


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServerProcess]:
    server = RedisServerProcess()
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServerProcess) -> str:
    """The test Redis, emptied before the test."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url
