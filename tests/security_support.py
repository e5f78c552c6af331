"""Helpers for the security tests: credentials files, and scheduler processes with TLS and
auth; certificates come from a CA made in the test (services/common/pki.py)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.common.channels import dial
from services.common.health import wait_for_serving
from services.common.net import free_port
from services.common.pki import Issued
from services.common.principals import token_digest
from services.common.tls import ChannelSecurity
from services.pb import scheduler_pb2_grpc
from tests.helpers import Service, start_service


@dataclass
class Tokens:
    """Fresh random tokens for two tenants and one worker."""

    acme: str
    globex: str
    worker: str

    @classmethod
    def new(cls) -> Tokens:
        return cls(secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(24))


def write_auth_file(
    path: Path,
    tokens: Tokens,
    *,
    acme_limits: str = "",
    worker_cert_cn: str = "",
) -> Path:
    """A credentials file: tenants acme and globex, one worker token (and, optionally, a
    worker certificate CN). ``acme_limits`` is TOML for [tenants.acme]."""
    worker_cn = f'cert_common_name = "{worker_cert_cn}"\n' if worker_cert_cn else ""
    path.write_text(
        f"""
[tenants.acme]
{acme_limits}

[[clients]]
tenant = "acme"
token_sha256 = "{token_digest(tokens.acme)}"

[[clients]]
tenant = "globex"
token_sha256 = "{token_digest(tokens.globex)}"

[[workers]]
name = "pool"
token_sha256 = "{token_digest(tokens.worker)}"

[[workers]]
name = "certified"
{worker_cn or 'token_sha256 = "' + "0" * 64 + '"'}
"""
    )
    return path


@dataclass
class SecureScheduler:
    service: Service
    address: str
    worker_address: str
    # Plain connection settings for this server (TLS or not); tokens go in per channel.
    base: ChannelSecurity

    def channel(self, token: str = "", address: str = "", **tls: str) -> grpc.Channel:
        settings = ChannelSecurity(**{**self.base.__dict__, "token": token, **tls})
        return dial(address or self.address, settings)

    def scheduler(self, token: str = "", **tls: str) -> scheduler_pb2_grpc.SchedulerStub:
        return scheduler_pb2_grpc.SchedulerStub(self.channel(token, **tls))

    def gateway(
        self, token: str = "", address: str = "", **tls: str
    ) -> scheduler_pb2_grpc.WorkerGatewayStub:
        """A WorkerGateway stub on the worker port (or ``address``)."""
        channel = self.channel(token, address or self.worker_address, **tls)
        return scheduler_pb2_grpc.WorkerGatewayStub(channel)


@pytest.fixture
def start_secure_scheduler(redis_url: str) -> Iterator[Callable[..., SecureScheduler]]:
    """``ssjf scheduler`` processes with the given security flags; stopped after the test."""
    started: list[SecureScheduler] = []

    def start(
        *flags: str,
        ca: Path | None = None,
        client: Issued | None = None,
        worker_port: bool = False,
        env: dict[str, str] | None = None,
        redis: str = "",
    ) -> SecureScheduler:
        port = free_port()
        worker = free_port() if worker_port else port
        extra = ["--worker-port", str(worker)] if worker_port else []
        service = start_service(
            ["scheduler", "--port", str(port), "--host", "127.0.0.1", *extra, *flags],
            env={"REDIS_URL": redis or redis_url, **(env or {})},
        )
        base = ChannelSecurity(
            tls=ca is not None,
            ca_file=str(ca or ""),
            client_cert_file=str(client.cert) if client else "",
            client_key_file=str(client.key) if client else "",
        )
        node = SecureScheduler(service, f"127.0.0.1:{port}", f"127.0.0.1:{worker}", base)
        started.append(node)
        try:
            wait_for_serving(
                node.address,
                timeout=30,
                alive=lambda: service.process.poll() is None,
                security=base,
            )
        except (TimeoutError, RuntimeError):
            raise AssertionError(f"scheduler did not start:\n{service.log()}") from None
        return node

    yield start
    for node in started:
        node.service.stop()
