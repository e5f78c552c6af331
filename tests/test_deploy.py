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


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error.

    PyYAML (and kubectl's parser in some versions) silently keeps the last of two equal
    keys, so a second ``securityContext:`` in a pod spec drops the first one's fields.
    Merge keys (``<<: *anchor``) are not repeats: explicit keys override merged ones.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first at {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def deploy_yaml_files() -> list[str]:
    """Every YAML file of the deployment: compose files, manifests, monitoring config."""
    patterns = [
        "docker-compose*.yml",
        "tests/compose/*.yml",
        "deploy/**/*.yaml",
        "deploy/**/*.yml",
    ]
    return sorted({str(p.relative_to(REPO_ROOT)) for g in patterns for p in REPO_ROOT.glob(g)})


@pytest.mark.parametrize("name", deploy_yaml_files())
def test_deploy_yaml_has_no_duplicate_keys(name: str):
    try:
        list(yaml.load_all((REPO_ROOT / name).read_text(), Loader=UniqueKeyLoader))
    except yaml.constructor.ConstructorError as error:
        pytest.fail(f"{name}: {error}")


def test_duplicate_key_check_catches_a_repeated_security_context():
    manifest = "spec:\n  securityContext: {runAsNonRoot: true}\n  securityContext: {fsGroup: 1}\n"
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'securityContext'"):
        yaml.load(manifest, Loader=UniqueKeyLoader)
    # Merge keys are not repeats.
    merged = "a: &a {x: 1}\nb:\n  <<: *a\n  x: 2\n"
    assert yaml.load(merged, Loader=UniqueKeyLoader)["b"] == {"x": 2}


def test_k8s_pods_run_as_non_root():
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.load_all(path.read_text(), Loader=UniqueKeyLoader):
            if document and document.get("kind") in ("Deployment", "StatefulSet"):
                context = document["spec"]["template"]["spec"].get("securityContext", {})
                assert context.get("runAsNonRoot") is True, f"{path.name}: {context}"
                assert context.get("runAsUser"), f"{path.name}: {context}"


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


# What users and tests/test_compose.py run: the standard file, the offline override merged
# on top, and the compose test's worker-model override on top of both.
COMPOSE_COMBINATIONS = [
    ["docker-compose.yml"],
    ["docker-compose.yml", "docker-compose.offline.yml"],
    ["docker-compose.yml", "docker-compose.offline.yml", "tests/compose/worker-model.yml"],
]


@pytest.mark.parametrize("files", COMPOSE_COMBINATIONS, ids="+".join)
def test_compose_file_is_valid_for_docker_compose(files: list[str]):
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    result = subprocess.run(
        ["docker-compose", *(arg for file in files for arg in ("-f", file)), "config", "-q"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_dockerfiles_run_real_commands():
    for dockerfile in (REPO_ROOT / "deploy" / "docker").glob("Dockerfile*"):
        text = dockerfile.read_text()
        if "COPY services" not in text:
            continue  # not an SSJF image (e.g. Dockerfile.valkey)
        assert "torch==2.13.0" in text, f"{dockerfile.name} must pin torch"
        for line in text.splitlines():
            if line.startswith("RUN ssjf "):
                build_parser().parse_args(line.removeprefix("RUN ssjf ").split())


def dockerfile_parts(name: str) -> tuple[set[str], list[str], str]:
    """A Dockerfile's build-argument names, its stages (FROM lines) and its runtime stage."""
    text = (REPO_ROOT / "deploy" / "docker" / name).read_text()
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    build_args = {line.split()[1].split("=")[0] for line in lines if line.startswith("ARG ")}
    stages = [line for line in lines if line.startswith("FROM ")]
    return build_args, stages, text.rsplit("\nFROM ", 1)[-1]


def uninstalled(text: str) -> set[str]:
    """The packages a Dockerfile's `pip uninstall -y` lines remove (continuations joined)."""
    joined = text.replace("\\\n", " ")
    return {
        package
        for command in joined.split("pip uninstall -y ")[1:]
        for package in command.split(";")[0].split()
    }


def test_gpu_dockerfile_is_built_like_the_cpu_one():
    # Dockerfile.gpu cannot be built here (no CUDA base image offline; PyPI's torch is a
    # multi-GB CUDA wheel): check statically that it follows the CPU image's pattern.
    cpu_args, cpu_stages, _ = dockerfile_parts("Dockerfile")
    gpu_args, gpu_stages, gpu_runtime = dockerfile_parts("Dockerfile.gpu")
    assert cpu_args == gpu_args >= {"BASE_IMAGE", "EXTRA_CA_BUNDLE", "WHEELHOUSE"}
    for stages in (cpu_stages, gpu_stages):
        assert len(stages) >= 2 and stages[0].endswith(" AS build"), stages
        assert stages[-1] == "FROM ${BASE_IMAGE}", stages
    assert "COPY --from=build /opt/ssjf /opt/ssjf" in gpu_runtime
    assert "USER ssjf" in gpu_runtime and "--uid 10001" in gpu_runtime
    assert "HEALTHCHECK" in gpu_runtime and "ssjf health" in gpu_runtime
    assert "pip install" not in gpu_runtime, "the runtime stage installs nothing with pip"
    cpu_text = (REPO_ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    gpu_text = (REPO_ROOT / "deploy" / "docker" / "Dockerfile.gpu").read_text()
    # The training-only packages both leave out (the GPU image also swaps onnxruntime).
    assert uninstalled(gpu_text) - {"onnxruntime"} == uninstalled(cpu_text) >= {"scikit-learn"}


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
            if "SSJF_METRICS_PORT" in env:  # one port per container there, shared here
                env["SSJF_METRICS_PORT"] = str(free_port())
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


# Kubernetes releases the manifests must be valid for: the oldest still commonly run and the
# newest the validator knows.
K8S_VERSIONS = ["1.29.0", "latest"]


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file#kind/name, document) of every Kubernetes resource kustomization.yaml applies."""
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    found = []
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((K8S_DIR / name).read_text()):
            if document:
                found.append(
                    (f"{name}#{document['kind']}/{document['metadata']['name']}", document)
                )
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_against_the_kubernetes_schemas(version: str):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    documents = k8s_documents()
    assert {path for path, _ in documents} >= {
        "redis.yaml#StatefulSet/redis",
        "worker-autoscaler.yaml#HorizontalPodAutoscaler/worker",
        "disruption-budgets.yaml#PodDisruptionBudget/worker",
    }
    for where, document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{where} is not a valid Kubernetes {version} resource: {error.message}")


def test_k8s_redis_persists_and_every_tier_has_a_disruption_budget():
    documents = dict(k8s_documents())
    redis_set = documents["redis.yaml#StatefulSet/redis"]
    args = redis_set["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    claim = redis_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    mounts = redis_set["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": claim, "mountPath": "/data"} in mounts
    budgets = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for d in documents.values()
        if d["kind"] == "PodDisruptionBudget"
    }
    assert budgets == {"scheduler", "predictor", "worker", "http"}


def test_k8s_metrics_ports_are_scrapable_over_https():
    """Every pod that serves /metrics says so (https, port 9400) and a NetworkPolicy lets
    Prometheus in on that port; without it the HPA's queue-depth metric never arrives."""
    documents = dict(k8s_documents())
    scraped = set()
    for where, document in documents.items():
        if document["kind"] != "Deployment":
            continue
        container = document["spec"]["template"]["spec"]["containers"][0]
        env = {item["name"]: item.get("value") for item in container.get("env", [])}
        if "SSJF_METRICS_PORT" not in env:
            continue
        annotations = document["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == env["SSJF_METRICS_PORT"], where
        assert annotations["prometheus.io/scrape"] == "true", where
        if "SSJF_TLS_CERT_FILE" in env:
            assert annotations.get("prometheus.io/scheme") == "https", where
        scraped.add(document["metadata"]["name"])
    assert scraped == {"scheduler", "predictor", "worker"}
    allowed = set()
    for document in documents.values():
        if document["kind"] != "NetworkPolicy":
            continue
        for rule in document["spec"].get("ingress", []):
            if {"port": 9400} in rule.get("ports", []) and any(
                "namespaceSelector" in peer for peer in rule.get("from", [])
            ):
                for expression in document["spec"]["podSelector"].get("matchExpressions", []):
                    allowed |= set(expression["values"])
    assert allowed >= scraped, f"port 9400 open to monitoring only on {allowed}"


def test_k8s_worker_autoscales_on_a_metric_the_scheduler_exports():
    from services.scheduler.metrics import QueueCollector
    from services.scheduler.models import QueueStats

    autoscaler = dict(k8s_documents())["worker-autoscaler.yaml#HorizontalPodAutoscaler/worker"]
    metric = autoscaler["spec"]["metrics"][0]["external"]["metric"]
    # The queue it watches is the one the workers serve.
    worker = next(c for c in k8s_containers() if c["name"] == "worker")
    served = {item["name"]: item["value"] for item in worker["env"]}["SSJF_SERVED_MODEL_NAME"]
    assert metric["selector"]["matchLabels"] == {"llm": served}
    collector = QueueCollector()
    collector.snapshot = [
        QueueStats(llm=served, queued=3, running=1, oldest_wait_s=0.5, counters={})
    ]
    exported = {
        (family.name, tuple(sorted(sample.labels.items())))
        for family in collector.collect()
        for sample in family.samples
    }
    wanted = (metric["name"], tuple(sorted(metric["selector"]["matchLabels"].items())))
    assert wanted in exported, f"the scheduler exports no {wanted}: {sorted(exported)}"
    # Every scheduler pod serves /metrics for Prometheus (and through it the adapter).
    scheduler = next(c for c in k8s_containers() if c["name"] == "scheduler")
    assert {"name": "SSJF_METRICS_PORT", "value": "9400"} in scheduler["env"]
