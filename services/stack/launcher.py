"""Start predictor, scheduler and workers as child processes, each a real gRPC server.

``ssjf up`` and the benchmarks use this; containers and Kubernetes run the same
sub-commands one per container instead.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from services.common.config import REDIS_URL_ENV
from services.common.health import wait_for_http, wait_for_serving
from services.common.net import free_port
from services.common.redis_store import EmbeddedRedis

log = logging.getLogger(__name__)

# The one interface every service of a local stack listens on.
LOOPBACK = "127.0.0.1"


@dataclass
class StackConfig:
    """What to run. Ports left at 0 are picked free at start."""

    port: int = 50051
    workers: int = 1
    redis_url: str | None = None
    predictor_port: int = 0
    worker_ports: list[int] = field(default_factory=list)
    policy: str = "ssjf"
    batching: str = "continuous"
    max_batch_size: int = 8
    # The default: the real instruct LLM, served under its own name (the predictor has a
    # head for it). Tests that need speed pass model="tiny-llama".
    served_model_name: str = "smollm2-135m-instruct"
    model: str | None = "smollm2-135m-instruct"
    # Extra flags passed through to each service, for anything not named above.
    predictor_args: list[str] = field(default_factory=list)
    scheduler_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    # Each service's output goes to <log_dir>/<name>.log; None: to this terminal.
    log_dir: Path | None = None
    log_level: str = "info"
    ready_timeout_s: float = 180.0
    # The OpenAI-compatible HTTP front (``ssjf http``): its port (0: any free one); None: none.
    http_port: int | None = None


@dataclass
class _Child:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_file: IO[bytes] | None


class LocalStack:
    """The whole stack as child processes; a context manager that stops all of it on exit."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.redis_url = config.redis_url
        self.address = f"{LOOPBACK}:{config.port}"
        self.http_url: str | None = None  # the front's base URL once started, e.g. .../v1
        self._children: list[_Child] = []
        self._embedded_redis: EmbeddedRedis | None = None

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        cfg = self.config
        if self.redis_url is None:
            self._embedded_redis = EmbeddedRedis()
            self.redis_url = self._embedded_redis.start()
        predictor_port = cfg.predictor_port or free_port()
        # Every service binds loopback only, the HTTP front too (its own default is every
        # interface): a local stack runs without auth or TLS (SECURITY.md).
        loopback = ["--host", LOOPBACK]
        predictor = self._spawn(
            "predictor",
            predictor_port,
            ["predictor", "--port", str(predictor_port), *loopback, *cfg.predictor_args],
        )
        scheduler_port = cfg.port or free_port()
        self.address = f"{LOOPBACK}:{scheduler_port}"
        scheduler = self._spawn(
            "scheduler",
            scheduler_port,
            [
                "scheduler",
                "--port", str(scheduler_port),
                *loopback,
                "--predictor", predictor.address,
                "--policy", cfg.policy,
                *cfg.scheduler_args,
            ],
            # The URL may hold a password: through the environment, not a flag in ps.
            env={REDIS_URL_ENV: self.redis_url},
        )  # fmt: skip
        workers = []
        for index in range(cfg.workers):
            port = cfg.worker_ports[index] if index < len(cfg.worker_ports) else free_port()
            args = [
                "worker",
                "--port", str(port),
                *loopback,
                "--scheduler", scheduler.address,
                "--batching", cfg.batching,
                "--max-batch-size", str(cfg.max_batch_size),
                "--served-model-name", cfg.served_model_name,
            ]  # fmt: skip
            if cfg.model:
                args += ["--model", cfg.model]
            workers.append(self._spawn(f"worker-{index}", port, [*args, *cfg.worker_args]))
        front = None
        if cfg.http_port is not None:
            http_port = cfg.http_port or free_port()
            front = self._spawn(
                "http",
                http_port,
                ["http", "--port", str(http_port), *loopback, "--scheduler", scheduler.address],
            )
        # Started together, waited on together: model loading overlaps across processes.
        for child in [predictor, scheduler, *workers]:
            wait_for_serving(
                child.address,
                timeout=cfg.ready_timeout_s,
                alive=lambda child=child: child.process.poll() is None,
            )
            log.info("service ready", extra={"service": child.name, "address": child.address})
        if front is not None:
            wait_for_http(
                f"http://{front.address}/health",
                timeout=cfg.ready_timeout_s,
                alive=lambda: front.process.poll() is None,
            )
            self.http_url = f"http://{front.address}/v1"
            log.info("service ready", extra={"service": "http", "url": self.http_url})

    def _spawn(
        self, name: str, port: int, args: list[str], env: dict[str, str] | None = None
    ) -> _Child:
        log_file = None
        if self.config.log_dir is not None:
            self.config.log_dir.mkdir(parents=True, exist_ok=True)
            log_file = (self.config.log_dir / f"{name}.log").open("wb")
        command = [sys.executable, "-m", "services.cli", "--log-level", self.config.log_level]
        process = subprocess.Popen(
            [*command, *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT if log_file else None,
        )
        child = _Child(name, f"{LOOPBACK}:{port}", process, log_file)
        self._children.append(child)
        return child

    def alive(self) -> bool:
        """True while every child process runs."""
        return all(child.process.poll() is None for child in self._children)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM in reverse start order (workers first, so they drain), then Redis."""
        for child in reversed(self._children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("killing unresponsive service", extra={"service": child.name})
                child.process.kill()
                child.process.wait()
            if child.log_file is not None:
                child.log_file.close()
        self._children.clear()
        if self._embedded_redis is not None:
            self._embedded_redis.stop()
            self._embedded_redis = None
