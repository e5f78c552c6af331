"""What can be checked of the container deployment without a Docker engine.

docker-compose.yml and the Kubernetes manifests must name real sub-commands and only
environment variables those sub-commands read; and the compose services, started as plain
processes with compose's own commands and environment, must come up and answer.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from typing import Any

import pytest
import yaml

from services.cli import build_parser
from services.common.channels import dial
from services.common.config import env_name
from services.common.health import wait_for_serving
from services.common.net import free_port
from services.common.tls import ChannelSecurity
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.helpers import REPO_ROOT, start_service

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
K8S_DIR = REPO_ROOT / "deploy" / "k8s"


def subcommand_env_names(command: str) -> set[str]:
    """Environment variables the ``ssjf <command>`` parser reads (one per option)."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subparsers.choices[command]
    names = {"REDIS_URL"} if any("--redis-url" in a.option_strings for a in sub._actions) else set()
    for action in [*parser._actions, *sub._actions]:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                names.add(env_name(option))
    return names


def compose_services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def k8s_containers() -> list[dict[str, Any]]:
    containers = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "Deployment":
                containers += document["spec"]["template"]["spec"]["containers"]
    return containers


def ssjf_containers() -> list[tuple[str, list[str], dict[str, str]]]:
    """(where, command, environment) of every container that runs the ssjf image."""
    found = []
    for name, service in compose_services().items():
        if service.get("image", "").startswith("ssjf"):
            found.append((f"compose:{name}", service["command"], service["environment"]))
    for container in k8s_containers():
        if container["image"] == "ssjf":
            env = {item["name"]: item["value"] for item in container.get("env", [])}
            found.append((f"k8s:{container['name']}", container["args"], env))
    return found


@pytest.mark.parametrize(("where", "command", "env"), ssjf_containers(), ids=lambda v: str(v))
def test_container_commands_and_environment_are_real(
    where: str, command: list[str], env: dict[str, str]
):
    known = subcommand_env_names(command[0])
    unknown = sorted(set(env) - known)
    assert not unknown, f"{where}: `ssjf {command[0]}` reads no {unknown}"
    # The command line parses as the container would run it.
    build_parser().parse_args(command)


def test_compose_file_is_valid_for_docker_compose():
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_dockerfiles_run_real_commands():
    for dockerfile in (REPO_ROOT / "deploy" / "docker").glob("Dockerfile*"):
        text = dockerfile.read_text()
        assert "torch==2.13.0" in text, f"{dockerfile.name} must pin torch"
        for line in text.splitlines():
            if line.startswith("RUN ssjf "):
                build_parser().parse_args(line.removeprefix("RUN ssjf ").split())


@pytest.mark.slow
def test_compose_services_start_as_processes_and_serve(redis_url: str, tmp_path):
    """Compose's commands and environment, secrets made by its own `secrets` command."""
    services = compose_services()
    secrets = tmp_path / "secrets"
    build_parser().parse_args(services["secrets"]["command"])
    made = subprocess.run(
        [sys.executable, "-m", "services.cli", "secrets", "--out", str(secrets)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    (secrets / "redis-url").write_text(redis_url)  # the test's Redis, not compose's TLS one
    ports = {name: free_port() for name in ("predictor", "scheduler", "worker")}
    worker_port = free_port()
    scheduler_env = services["scheduler"]["environment"]
    started = []
    try:
        for name in ("predictor", "scheduler", "worker"):
            env = dict(services[name]["environment"])
            env["SSJF_PORT"] = str(ports[name])
            env["SSJF_HOST"] = "127.0.0.1"
            if "SSJF_WORKER_PORT" in env:
                env["SSJF_WORKER_PORT"] = str(worker_port)
            for key, value in env.items():
                env[key] = value.replace("/secrets/", f"{secrets}/").replace(
                    f"scheduler:{scheduler_env['SSJF_WORKER_PORT']}", f"127.0.0.1:{worker_port}"
                )
                for peer in ("predictor", "scheduler"):
                    env[key] = env[key].replace(
                        f"{peer}:{services[peer]['environment']['SSJF_PORT']}",
                        f"127.0.0.1:{ports[peer]}",
                    )
            started.append(start_service(services[name]["command"], env))
        health = ChannelSecurity(
            tls=True,
            ca_file=str(secrets / "ca.crt"),
            client_cert_file=str(secrets / "scheduler-client.crt"),
            client_key_file=str(secrets / "scheduler-client.key"),
        )
        for name in ("predictor", "scheduler", "worker"):
            wait_for_serving(f"127.0.0.1:{ports[name]}", timeout=180, security=health)
        client = ChannelSecurity(
            tls=True,
            ca_file=str(secrets / "ca.crt"),
            token=(secrets / "tokens" / "demo.token").read_text().strip(),
        )
        with dial(f"127.0.0.1:{ports['scheduler']}", client) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            request = scheduler_pb2.GenerateRequest(
                prompt="Hello", sampling=common_pb2.SamplingParams(max_new_tokens=3)
            )
            events = list(stub.Generate(request, timeout=120))
        assert events[-1].summary.state == common_pb2.JOB_STATE_DONE
        assert events[-1].summary.generated_tokens == 3
        assert not events[-1].summary.prediction_fallback
    finally:
        for service in reversed(started):
            service.stop()
