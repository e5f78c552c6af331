"""The Node.js client example (clients/node) against a live stack: generate, submit, stream,
cancel, through stubs built from protos/ by @grpc/grpc-js's proto-loader."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from services.common.net import free_port
from tests.helpers import REPO_ROOT, start_service, wait_for_health

NODE_CLIENT = REPO_ROOT / "clients" / "node"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None or not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.skip("needs node and `npm ci` in clients/node (.ci/run installs both)")
    return node


def test_node_client_generates_streams_and_cancels(node: str, redis_url: str):
    port = free_port()
    # --http-port 0: no HTTP front (its default port 8000 may be taken on a shared host).
    up = start_service(
        ["up", "--port", str(port), "--workers", "1", "--http-port", "0"], {"REDIS_URL": redis_url}
    )
    try:
        wait_for_health(f"127.0.0.1:{port}", timeout=240)
        deadline = time.monotonic() + 240
        while "ssjf generate" not in up.log():  # printed once the workers are ready
            assert up.process.poll() is None, up.log()
            assert time.monotonic() < deadline, up.log()
            time.sleep(0.2)
        result = subprocess.run(
            [node, "client.js", "demo"],
            cwd=NODE_CLIENT,
            env={"SSJF_SCHEDULER": f"127.0.0.1:{port}", "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        steps = {}
        for line in result.stdout.splitlines():
            if line.startswith("{"):
                step = json.loads(line)
                steps[step["step"]] = step
        generated = steps["generate"]
        assert generated["state"] == "JOB_STATE_DONE"
        assert generated["tokens"] == generated["generated_tokens"] > 0
        cancelled = steps["submit-stream-cancel"]
        assert cancelled["cancelled"] is True
        assert cancelled["job_state"] == "JOB_STATE_CANCELLED"
        assert cancelled["tokens_seen"] >= 5
        assert cancelled["generated_tokens"] < 2000, "the cancel did not stop the worker"
    finally:
        assert up.stop() == 0, up.log()
