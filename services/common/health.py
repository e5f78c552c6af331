"""Waiting for a server to be ready: gRPC servers through the standard health service,
HTTP servers through their health URL."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channels import dial
from services.common.tls import ChannelSecurity


def wait_for_serving(
    address: str,
    timeout: float = 60.0,
    service: str = "",
    alive: object = None,
    security: ChannelSecurity | None = None,
) -> None:
    """Block until ``address`` reports SERVING for ``service``.

    ``alive`` is an optional callable returning False once the server's process has died,
    so a crash is reported at once instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    with dial(address, security) as channel:  # TLS per SSJF_TLS_*; health needs no token
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if callable(alive) and not alive():
                raise RuntimeError(f"the server for {address} exited before it was ready")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                last_error = error
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s (last error: {last_error})")


def wait_for_http(url: str, timeout: float = 60.0, alive: object = None) -> None:
    """Block until ``url`` (an HTTP server's health URL) answers 2xx; ``alive`` as above."""
    import urllib.request

    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if callable(alive) and not alive():
            raise RuntimeError(f"the server for {url} exited before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except OSError as error:
            last_error = error
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer after {timeout:.0f}s (last error: {last_error})")
