"""The compose stack end to end, in real containers (`make test-compose`).

Needs a Docker engine, docker-compose and the images (`make images`), so it only runs when
SSJF_COMPOSE_TEST=1. One test walks the whole story, because every step needs the stack the
previous one left: healthy containers, a streamed generation from the host, the HTTPS
OpenAI front, three workers all serving, a worker stopped mid-job whose job finishes on
another, and a queued job that survives `down` + `up` through Redis's AOF volume.

The stack runs as shipped: TLS and tokens on. The host-side client gets the CA and the demo
tenant's token out of the stack's secrets volume with `deploy/secrets/generate.sh
--from-compose` and dials with services/common/channels.py like every SSJF client.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from deploy.monitoring.dashboard import dashboard
from services.common.channels import dial
from services.common.health import wait_for_serving
from services.common.net import free_port
from services.common.tls import ChannelSecurity
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.helpers import REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        os.environ.get("SSJF_COMPOSE_TEST") != "1",
        reason="needs a Docker engine and the images: make test-compose",
    ),
]

# Jobs the workers are told to generate: long enough to outlive a `docker stop`.
LONG_JOB_TOKENS = 1500


def log(message: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


class ComposeStack:
    """`docker-compose -p <unique project>` over docker-compose.yml (+ the offline override)."""

    def __init__(self) -> None:
        self.project = f"ssjfct{uuid.uuid4().hex[:8]}"
        self.files = ["docker-compose.yml"]
        offline = os.environ.get("SSJF_COMPOSE_OFFLINE", "auto")
        if offline == "1" or (offline == "auto" and not _image_exists("redis:7.2-alpine")):
            self.files.append("docker-compose.offline.yml")
        # SSJF_COMPOSE_MODEL=default: the model baked into the image instead of tiny-llama.
        if os.environ.get("SSJF_COMPOSE_MODEL") != "default":
            self.files.append("tests/compose/worker-model.yml")
        self.port = free_port()
        self.http_port = free_port()
        self.env = {
            **os.environ,
            "SSJF_SCHEDULER_PORT": str(self.port),
            "SSJF_HTTP_PORT": str(self.http_port),
        }
        self.secrets_dir = Path(tempfile.mkdtemp(prefix="ssjf-compose-secrets-"))

    def compose(self, *args: str, timeout: float = 600) -> str:
        command = ["docker-compose", "-p", self.project]
        for file in self.files:
            command += ["-f", file]
        result = subprocess.run(
            [*command, *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, f"docker-compose {' '.join(args)}:\n{result.stderr}"
        return result.stdout

    def containers(self, service: str | None = None) -> list[dict]:
        """docker inspect of the project's running containers (of one service)."""
        ids = self.compose("ps", "-q", *([service] if service else [])).split()
        if not ids:
            return []
        out = subprocess.run(
            ["docker", "inspect", *ids], capture_output=True, text=True, check=True
        ).stdout
        return [c for c in json.loads(out) if c["State"]["Running"]]

    def wait_healthy(self, expected: int, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            containers = self.containers()
            states = {
                c["Name"]: c["State"].get("Health", {}).get("Status", "none") for c in containers
            }
            if len(states) == expected and all(s in ("healthy", "none") for s in states.values()):
                log(f"{expected} containers healthy: {sorted(states)}")
                return
            time.sleep(3)
        pytest.fail(f"containers not healthy in {timeout}s: {states}\n{self.compose('logs')}")

    def client_security(self) -> ChannelSecurity:
        """TLS with the stack's CA and the demo tenant's token, copied out of the secrets
        volume by the documented helper, deploy/secrets/generate.sh --from-compose."""
        subprocess.run(
            ["deploy/secrets/generate.sh", "--from-compose", "--out", str(self.secrets_dir)],
            cwd=REPO_ROOT,
            env={
                **self.env,
                "COMPOSE_PROJECT_NAME": self.project,
                "COMPOSE_FILE": os.pathsep.join(self.files),
            },
            check=True,
            capture_output=True,
            timeout=120,
        )
        token_file = self.secrets_dir / "tokens" / "demo.token"
        return ChannelSecurity(
            tls=True,
            ca_file=str(self.secrets_dir / "ca.crt"),
            token=token_file.read_text().strip(),
            token_file=str(token_file),
        )

    def dial_scheduler(self) -> tuple[grpc.Channel, scheduler_pb2_grpc.SchedulerStub]:
        address = f"127.0.0.1:{self.port}"
        security = self.client_security()
        wait_for_serving(address, timeout=120, security=security)
        channel = dial(address, security)
        return channel, scheduler_pb2_grpc.SchedulerStub(channel)

    def worker_hosts(self) -> dict[str, str]:
        """Container hostname (the prefix of its worker ids) -> container name."""
        return {c["Config"]["Hostname"]: c["Name"].lstrip("/") for c in self.containers("worker")}


def _image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeStack]:
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install docker.io docker-compose)")
    stack = ComposeStack()
    log(f"project {stack.project}, files {stack.files}, scheduler on host port {stack.port}")
    try:
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", timeout=300)
        shutil.rmtree(stack.secrets_dir, ignore_errors=True)
        log("down -v: stack and volumes removed")


def request(prompt: str, tokens: int) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        prompt=prompt,
        # replay_output_tokens: exactly this many tokens, whatever the model would say.
        sampling=common_pb2.SamplingParams(replay_output_tokens=tokens),
    )


def stream(stub: scheduler_pb2_grpc.SchedulerStub, job_id: str) -> list[scheduler_pb2.JobEvent]:
    return list(stub.Stream(scheduler_pb2.StreamRequest(job_id=job_id), timeout=900))


def assert_dense_and_done(events: list[scheduler_pb2.JobEvent], tokens: int) -> None:
    indexes = [e.token.index for e in events if e.WhichOneof("event") == "token"]
    assert indexes == list(range(tokens)), "token stream has a gap or a duplicate"
    assert events[-1].summary.state == common_pb2.JOB_STATE_DONE, events[-1].summary


def served_model() -> str:
    """The model name compose's workers serve (what an OpenAI client asks for)."""
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    return services["worker"]["environment"]["SSJF_SERVED_MODEL_NAME"]


def https_chat(stack: ComposeStack, security: ChannelSecurity, max_tokens: int) -> dict:
    """POST /v1/chat/completions to the HTTP front over https, with the demo token."""
    body = {
        "model": served_model(),
        "messages": [{"role": "user", "content": "Hello over https"}],
        "max_tokens": max_tokens,
    }
    call = urllib.request.Request(
        f"https://127.0.0.1:{stack.http_port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {security.token}"},
    )
    context = ssl.create_default_context(cafile=security.ca_file)
    with urllib.request.urlopen(call, timeout=300, context=context) as reply:
        assert reply.status == 200
        return json.load(reply)


def https_chat_stream(stack: ComposeStack, security: ChannelSecurity, max_tokens: int) -> dict:
    """The same call with ``"stream": true``: read the SSE events as they arrive."""
    body = {
        "model": served_model(),
        "messages": [{"role": "user", "content": "Stream over https"}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    call = urllib.request.Request(
        f"https://127.0.0.1:{stack.http_port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "Authorization": f"Bearer {security.token}",
        },
    )
    context = ssl.create_default_context(cafile=security.ca_file)
    chunks: list[dict] = []
    done = False
    with urllib.request.urlopen(call, timeout=300, context=context) as reply:
        assert reply.status == 200
        assert reply.headers.get_content_type() == "text/event-stream", reply.headers
        for raw in reply:  # one SSE line at a time, as the front flushes them
            line = raw.decode().rstrip("\r\n")
            if not line.startswith("data: "):
                assert line == "" or line.startswith(":"), line  # blank separators, comments
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            chunks.append(chunk)
    assert done, "the SSE stream ended without data: [DONE]"
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert deltas and deltas[0].get("role") == "assistant", chunks[:2]
    assert finish[-1] in ("stop", "length"), chunks[-2:]
    assert len(usage) == 1, chunks[-2:]
    return {
        "text": "".join(d.get("content") or "" for d in deltas),
        "content_chunks": sum(1 for d in deltas if d.get("content")),
        "finish_reason": finish[-1],
        "usage": usage[0],
    }


def node_client_demo(stack: ComposeStack, security: ChannelSecurity) -> dict | None:
    """clients/node/client.js demo against the secured stack (TLS + the demo token), when
    node and clients/node's packages are installed; None otherwise."""
    node = shutil.which("node")
    if node is None or not (REPO_ROOT / "clients" / "node" / "node_modules").is_dir():
        return None
    result = subprocess.run(
        [node, "client.js", "demo"],
        cwd=REPO_ROOT / "clients" / "node",
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SSJF_SCHEDULER": f"127.0.0.1:{stack.port}",
            "SSJF_TLS_CA_FILE": security.ca_file,
            "SSJF_TOKEN_FILE": security.token_file,
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return {
        step["step"]: step
        for step in (json.loads(line) for line in result.stdout.splitlines() if line[:1] == "{")
    }


def test_compose_stack_end_to_end(stack: ComposeStack):
    started = time.monotonic()
    stack.compose(
        "up", "-d", "--scale", "worker=2", "redis", "predictor", "scheduler", "worker", "http"
    )  # fmt: skip
    stack.wait_healthy(expected=6)  # the one-shot secrets container has exited by then
    channel, stub = stack.dial_scheduler()
    # Secured as shipped: without the token the scheduler refuses.
    with grpc.secure_channel(
        f"127.0.0.1:{stack.port}",
        grpc.ssl_channel_credentials(Path(stack.secrets_dir / "ca.crt").read_bytes()),
    ) as anonymous:
        with pytest.raises(grpc.RpcError) as refused:
            scheduler_pb2_grpc.SchedulerStub(anonymous).Submit(request("no token", 4), timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value

    # 1. A generation streamed from the host.
    events = list(stub.Generate(request("Hello from the host", 12), timeout=300))
    assert_dense_and_done(events, 12)
    # Scored by the predictor container: in time for Submit, or by the async re-score that
    # follows when it answers late on a loaded host (prediction_fallback is true then).
    scored = stub.GetJob(scheduler_pb2.GetJobRequest(job_id=events[-1].job_id), timeout=60)
    assert scored.predictor_version, f"the predictor container did not answer: {scored}"
    log(f"streamed a 12-token generation from the host ({time.monotonic() - started:.0f}s in)")

    # 1b. The OpenAI front over https, the same token.
    answer = https_chat(stack, stack.client_security(), max_tokens=8)
    assert answer["choices"][0]["message"]["role"] == "assistant", answer
    assert 1 <= answer["usage"]["completion_tokens"] <= 8, answer
    log(f"https /v1/chat/completions answered {answer['usage']['completion_tokens']} tokens")
    streamed = https_chat_stream(stack, stack.client_security(), max_tokens=8)
    assert 1 <= streamed["usage"]["completion_tokens"] <= 8, streamed
    assert streamed["content_chunks"] >= 1, streamed
    log(
        f"https SSE stream: {streamed['content_chunks']} content chunks, "
        f"{streamed['usage']['completion_tokens']} tokens, finish {streamed['finish_reason']}"
    )

    # 1c. The Node.js example client, with TLS and the token.
    steps = node_client_demo(stack, stack.client_security())
    if steps is None:
        log("node client: skipped (node or clients/node/node_modules missing: npm ci)")
    else:
        assert steps["generate"]["state"] == "JOB_STATE_DONE", steps
        assert steps["generate"]["tokens"] == steps["generate"]["generated_tokens"] > 0, steps
        assert steps["submit-stream-cancel"]["job_state"] == "JOB_STATE_CANCELLED", steps
        log(f"node client over TLS + token: {steps['generate']['tokens']} tokens, cancel ok")

    # 2. Three workers, all serving.
    stack.compose("up", "-d", "--no-recreate", "--scale", "worker=3", "worker")
    stack.wait_healthy(expected=7)
    hosts = stack.worker_hosts()
    assert len(hosts) == 3
    job_ids = [
        stub.Submit(request(f"Job {i}: tell a story", 96), timeout=60).job_id for i in range(36)
    ]
    for job_id in job_ids:
        assert_dense_and_done(stream(stub, job_id), 96)
    served_by = [stub.GetJob(scheduler_pb2.GetJobRequest(job_id=j)).worker_id for j in job_ids]
    containers = {hosts[w.split("-")[0]] for w in served_by}
    counts = {c: sum(hosts[w.split("-")[0]] == c for w in served_by) for c in containers}
    log(f"36 jobs served by {len(containers)} worker containers: {counts}")
    assert containers == set(hosts.values()), f"not every worker served: {counts}"

    # 3. A worker container stopped mid-job: the job finishes on another one.
    job_id = stub.Submit(request("A long story", LONG_JOB_TOKENS), timeout=60).job_id
    collected: list[scheduler_pb2.JobEvent] = []
    reader = threading.Thread(target=lambda: collected.extend(stream(stub, job_id)))
    reader.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
        if job.generated_tokens >= 20:
            break
        time.sleep(0.2)
    assert job.state == common_pb2.JOB_STATE_STREAMING, job
    first_worker = job.worker_id
    victim = stack.worker_hosts()[first_worker.split("-")[0]]
    # A stop whose grace period is shorter than the job: the drain cannot finish it, so the
    # lease lapses and the scheduler hands the rest of the job to another worker.
    subprocess.run(["docker", "stop", "--time", "2", victim], check=True, capture_output=True)
    log(f"stopped {victim} at token {job.generated_tokens} of {LONG_JOB_TOKENS}")
    reader.join(timeout=900)
    assert not reader.is_alive()
    assert_dense_and_done(collected, LONG_JOB_TOKENS)
    job = stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
    assert job.attempts >= 2 and job.worker_id != first_worker, job
    log(
        f"job finished on {stack.worker_hosts().get(job.worker_id.split('-')[0], '?')} after "
        f"{job.attempts} attempts, {LONG_JOB_TOKENS} dense tokens"
    )

    # 4. Redis's AOF volume: a queued job survives `down` and `up`.
    stack.compose("stop", "worker", timeout=300)
    queued_id = stub.Submit(request("Survive a restart", 8), timeout=60).job_id
    job = stub.GetJob(scheduler_pb2.GetJobRequest(job_id=queued_id))
    assert job.state in (
        common_pb2.JOB_STATE_SUBMITTED,
        common_pb2.JOB_STATE_PREDICTED,
        common_pb2.JOB_STATE_QUEUED,
    ), job
    channel.close()
    time.sleep(2)  # appendfsync everysec
    stack.compose("down", timeout=300)
    log("down (volumes kept) with one job queued")
    stack.compose("up", "-d", "--scale", "worker=1", "redis", "predictor", "scheduler", "worker")
    stack.wait_healthy(expected=4)
    channel, stub = stack.dial_scheduler()
    with channel:
        assert_dense_and_done(stream(stub, queued_id), 8)
    log(f"the queued job survived the restart and finished ({time.monotonic() - started:.0f}s)")


def test_image_leaves_the_training_stack_out():
    """The packages deploy/docker/Dockerfile uninstalls are gone from the image, and every
    serving command's modules still import without them (the stack test proves they serve)."""
    image = os.environ.get("SSJF_IMAGE", "ssjf:cpu")
    script = (
        "import importlib, importlib.util as u\n"
        "gone = ['sklearn', 'scipy', 'matplotlib', 'onnx']\n"
        "print('present:', [m for m in gone if u.find_spec(m)])\n"
        "for m in ['services.predictor.server', 'services.scheduler.server',\n"
        "          'services.worker.server', 'services.http.server', 'services.stack.cli']:\n"
        "    importlib.import_module(m)\n"
    )
    result = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python3", image, "-c", script],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "present: []" in result.stdout, result.stdout
    log(f"{image}: no scikit-learn, scipy, matplotlib or onnx; serving modules import")


def _prometheus(port: int, query: str) -> list[dict]:
    # Prometheus's own UI/API stays http on the host; its scrapes of /metrics are https.
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)["data"]["result"]


def test_monitoring_profile_scrapes_every_service():
    """Prometheus of the monitoring profile finds the scheduler, predictor and worker
    through compose DNS and sees the job and worker histograms move after a generation.
    (Grafana is pull-only on an offline host: not started here.)"""
    stack = ComposeStack()
    if "docker-compose.offline.yml" in stack.files and not _image_exists("ssjf-prometheus:local"):
        pytest.skip("no Prometheus image: make images-monitoring")
    prometheus_port = free_port()
    stack.env["SSJF_PROMETHEUS_PORT"] = str(prometheus_port)
    log(f"monitoring: project {stack.project}, prometheus on host port {prometheus_port}")
    try:
        stack.compose(
            "--profile", "monitoring", "up", "-d",
            "redis", "predictor", "scheduler", "worker", "prometheus",
        )  # fmt: skip
        stack.wait_healthy(expected=5)  # prometheus has no health check: 4 + 1 running
        channel, stub = stack.dial_scheduler()
        with channel:
            assert_dense_and_done(list(stub.Generate(request("Hi", 8), timeout=300)), 8)
        deadline = time.monotonic() + 180
        while True:
            up = {r["metric"]["service"]: r["value"][1] for r in _prometheus(prometheus_port, "up")}
            done = _prometheus(prometheus_port, "sum(ssjf_job_completion_seconds_count)")
            tokens = _prometheus(prometheus_port, "sum(ssjf_worker_generated_tokens_total)")
            if (
                up == {"scheduler": "1", "predictor": "1", "worker": "1"}
                and done
                and float(done[0]["value"][1]) >= 1
                and tokens
                and float(tokens[0]["value"][1]) >= 8
            ):
                break
            assert time.monotonic() < deadline, f"targets {up}, jobs {done}, tokens {tokens}"
            time.sleep(3)
        log(f"prometheus scrapes {sorted(up)}; job and worker histograms recorded")
        # Every dashboard query runs on the real Prometheus (a syntax error is HTTP 400), with
        # Grafana's variables as "All"; the queue gauges get their policy by the info join.
        queries = [
            t["expr"]
            .replace("$__rate_interval", "1m")
            .replace("$policy", ".*")
            .replace("$llm", ".*")
            for panel in dashboard()["panels"]
            for t in panel["targets"]
        ]
        for query in queries:
            _prometheus(prometheus_port, query)
        queued = _prometheus(prometheus_port, queries[0])  # the queue-depth panel's first query
        assert queued and all(r["metric"].get("policy") for r in queued), queued
        log(f"{len(queries)} dashboard queries ran; queue depth by {queued[0]['metric']}")
    finally:
        stack.compose("--profile", "monitoring", "down", "-v", "--remove-orphans", timeout=300)
        shutil.rmtree(stack.secrets_dir, ignore_errors=True)
