"""A real ``redis-server`` on a free port, owned by a test: services/common/redis_store.py's
LocalRedisServer (which the benchmarks use), plus what only tests need, restarts and an
append-only file.

Services find Redis through ``REDIS_URL`` (or run the embedded one).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from services.common.redis_store import LocalRedisServer


class RedisServerProcess(LocalRedisServer):
    """Kill, stop and restart it at will. Nothing is persisted unless ``aof`` is set: then
    it keeps an append-only file (``appendfsync everysec``, as compose and Kubernetes run
    Redis) in its own directory, and a restart reloads every job."""

    def __init__(self, aof: bool = False) -> None:
        self.aof = aof
        self.directory = Path(tempfile.mkdtemp(prefix="ssjf-redis-")) if aof else None
        super().__init__(
            ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.directory)]
            if aof
            else ["--appendonly", "no"]
        )

    def restart(self) -> None:
        """With AOF, a clean SIGTERM (Redis flushes the file first); without, SIGKILL."""
        if self.aof:
            self.stop()
        else:
            self.kill()
        self.start()

    def cleanup(self) -> None:
        self.kill()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
