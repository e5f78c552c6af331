"""TLS on every hop of the real stack, with every credential from files or the environment.

predictor (TLS, client certificates required) <- scheduler (TLS, tokens, separate worker
port; dials the predictor with its client certificate) <- worker (its own TLS server; a
worker token from a file) and ``ssjf generate`` (a tenant token from a file). The answer
must stream with a real prediction (no fallback), and no secret may show on any command
line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.health import wait_for_serving
from services.common.net import free_port
from services.common.pki import CertificateAuthority
from services.common.tls import ChannelSecurity
from tests.helpers import REPO_ROOT, start_service
from tests.security_support import Tokens, write_auth_file

pytestmark = pytest.mark.slow
LLM = "vicuna-13b"


def test_whole_stack_over_tls_with_tokens(redis_url: str, tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    predictor_cert, scheduler_cert, worker_cert = (
        ca.issue("predictor"), ca.issue("scheduler"), ca.issue("worker")
    )  # fmt: skip
    scheduler_client = ca.issue("scheduler-client", server=False)
    tokens = Tokens.new()
    auth = write_auth_file(tmp_path / "auth.toml", tokens)
    (tmp_path / "worker.token").write_text(tokens.worker + "\n")
    (tmp_path / "client.token").write_text(tokens.acme + "\n")
    ports = {name: free_port() for name in ("predictor", "scheduler", "gateway", "worker")}
    address = {name: f"127.0.0.1:{port}" for name, port in ports.items()}

    def tls_flags(issued) -> list[str]:
        return ["--host", "127.0.0.1", "--tls-cert-file", str(issued.cert),
                "--tls-key-file", str(issued.key)]  # fmt: skip

    services = [
        start_service(
            ["predictor", "--port", str(ports["predictor"]), *tls_flags(predictor_cert),
             "--tls-client-ca-file", str(ca.cert)]
        ),
        start_service(
            ["scheduler", "--port", str(ports["scheduler"]), *tls_flags(scheduler_cert),
             "--worker-port", str(ports["gateway"]), "--auth-file", str(auth),
             "--predictor", address["predictor"], "--default-llm", LLM],
            env={
                "REDIS_URL": redis_url,
                "SSJF_TLS_CA_FILE": str(ca.cert),
                "SSJF_TLS_CLIENT_CERT_FILE": str(scheduler_client.cert),
                "SSJF_TLS_CLIENT_KEY_FILE": str(scheduler_client.key),
            },
        ),
        start_service(
            ["worker", "--port", str(ports["worker"]), *tls_flags(worker_cert),
             "--scheduler", address["gateway"], "--batching", "none",
             "--served-model-name", LLM],
            env={"SSJF_TLS_CA_FILE": str(ca.cert),
                 "SSJF_TOKEN_FILE": str(tmp_path / "worker.token")},
        ),
    ]  # fmt: skip
    try:
        with_ca = ChannelSecurity(tls=True, ca_file=str(ca.cert))
        as_scheduler = ChannelSecurity(
            tls=True,
            ca_file=str(ca.cert),
            client_cert_file=str(scheduler_client.cert),
            client_key_file=str(scheduler_client.key),
        )
        wait_for_serving(address["predictor"], 180, security=as_scheduler)
        for name in ("scheduler", "gateway", "worker"):
            wait_for_serving(address[name], 180, security=with_ca)
        generated = subprocess.run(
            [sys.executable, "-m", "services.cli", "generate", "Name three colours.",
             "--server", address["scheduler"], "--max-new-tokens", "6"],
            cwd=REPO_ROOT,
            env={**os.environ, "SSJF_TLS_CA_FILE": str(ca.cert),
                 "SSJF_TOKEN_FILE": str(tmp_path / "client.token")},
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        logs = "\n".join(service.log()[-2000:] for service in services)
        assert generated.returncode == 0, generated.stderr + logs
        assert "[done" in generated.stderr and "predictor fallback" not in generated.stderr
        # ssjf collect dials the same way (TLS from the environment, the client's token).
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"prompt_id": 1, "prompt": "hi"}\n{"prompt_id": 2, "prompt": "Why?"}\n')
        collected = subprocess.run(
            [sys.executable, "-m", "services.cli", "collect", "--server", address["scheduler"],
             "--prompts", str(prompts), "--out", str(tmp_path / "labels"),
             "--max-new-tokens", "4", "--label", LLM],
            cwd=REPO_ROOT,
            env={**os.environ, "SSJF_TLS_CA_FILE": str(ca.cert),
                 "SSJF_TOKEN_FILE": str(tmp_path / "client.token")},
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert collected.returncode == 0, collected.stdout + collected.stderr
        assert len((tmp_path / "labels" / "lengths.csv").read_text().splitlines()) == 3
        # Without the token the same command is refused.
        refused = subprocess.run(
            [sys.executable, "-m", "services.cli", "generate", "hi",
             "--server", address["scheduler"], "--tls-ca-file", str(ca.cert)],
            cwd=REPO_ROOT, env={k: v for k, v in os.environ.items() if "SSJF_TOKEN" not in k},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        for service in services:
            command_line = Path(f"/proc/{service.process.pid}/cmdline").read_bytes().decode()
            for secret in (tokens.acme, tokens.worker, tokens.globex):
                assert secret not in command_line
    finally:
        for service in reversed(services):
            service.stop()
