"""Helpers for tests that run real servers: free ports, subprocess services, health waits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from services.common.health import wait_for_serving
from services.common.paths import CHECKOUT_ROOT

REPO_ROOT = CHECKOUT_ROOT


def run_ssjf(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``ssjf ARGS`` in a child process, its output captured; never raises on exit status."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def wait_for_health(address: str, timeout: float = 60.0, service: str = "") -> None:
    """Block until the gRPC health service at ``address`` reports SERVING."""
    wait_for_serving(address, timeout, service)


class Service:
    """An ``ssjf`` sub-command running as a real process, its output kept in a log file."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = Path(tempfile.mkstemp(prefix="ssjf-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "--log-level", "debug", *args],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def terminate(self) -> None:
        """SIGTERM without waiting: the process drains on its own (a rolling restart)."""
        self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (a crash)."""
        self.process.kill()
        self.process.wait()
        self._log.close()


def start_service(args: list[str], env: dict[str, str] | None = None) -> Service:
    return Service(args, env)
