"""Security with real processes: TLS with a CA made in the test, mutual TLS, bearer tokens
for clients (tenants) and workers, tenants' isolation, quotas, the fake-worker attack, a
separate worker port, reflection and metrics limits, certificate rotation, Redis over TLS.

Every scheduler here is a real ``ssjf scheduler`` process on the test's own Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.channels import dial_aio
from services.common.net import free_port
from services.common.pki import CertificateAuthority, Issued
from services.common.tls import ChannelSecurity
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.keys import LLMS_KEY, completions_key, job_key
from tests.helpers import REPO_ROOT, listening_addresses, start_service
from tests.scheduler_support import ReportSession, progress, request
from tests.security_support import (
    Tokens,
    start_secure_scheduler,
    write_auth_file,
)
from tests.test_http_api import wait_for_front

__all__ = ["start_secure_scheduler"]  # fixture, imported for pytest

LLM = "vicuna-13b"
DONE = common_pb2.JOB_STATE_DONE
CANCELLED = common_pb2.JOB_STATE_CANCELLED
EOS = common_pb2.FINISH_REASON_EOS


@pytest.fixture
def tokens() -> Tokens:
    return Tokens.new()


@pytest.fixture
def pki(tmp_path: Path) -> dict:
    ca = CertificateAuthority(tmp_path / "pki")
    rogue = CertificateAuthority(tmp_path / "rogue", name="rogue-ca")
    return {
        "ca": ca,
        "server": ca.issue("scheduler"),
        "worker": ca.issue("ssjf-worker", server=False),
        "stranger": ca.issue("someone-else", server=False),
        "rogue_ca": rogue,
        "rogue_worker": rogue.issue("ssjf-worker", server=False, file_stem="rogue-worker"),
    }


def lease_request(wait_ms: int = 0) -> scheduler_pb2.LeaseRequest:
    return scheduler_pb2.LeaseRequest(worker_id="w", llms=[LLM], max_jobs=1, wait_ms=wait_ms)


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        result = call(*args, timeout=20, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, scheduler_pb2.Job):
            list(result)
    return raised.value.code()


# TLS -----------------------------------------------------------------------------------


def test_tls_handshake_with_a_test_ca_and_plaintext_refused(
    start_secure_scheduler, pki, tokens, tmp_path
) -> None:
    server = pki["server"]
    node = start_secure_scheduler(
        "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
        "--auth-file", str(write_auth_file(tmp_path / "auth.toml", tokens)),
        ca=pki["ca"].cert,
    )  # fmt: skip
    submitted = node.scheduler(tokens.acme).Submit(request(), timeout=20)
    assert submitted.job_id
    # Plaintext to a TLS port, and TLS trusting another CA, both fail the handshake.
    plain = node.scheduler(tokens.acme, tls=False, ca_file="")
    assert code_of(plain.Submit, request()) == grpc.StatusCode.UNAVAILABLE
    rogue_ca = str(pki["rogue_ca"].cert)
    wrong_ca = node.scheduler(tokens.acme, ca_file=rogue_ca)
    assert code_of(wrong_ca.Submit, request()) == grpc.StatusCode.UNAVAILABLE


def _served_common_name(address: str, ca: Path) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
    return subject["commonName"]


def test_rotated_certificate_is_served_without_restart(start_secure_scheduler, pki) -> None:
    ca, first = pki["ca"], pki["server"]
    live = Path(first.cert.parent / "live")
    live.mkdir()
    shutil.copy(first.cert, live / "tls.crt")
    shutil.copy(first.key, live / "tls.key")
    node = start_secure_scheduler(
        "--tls-cert-file", str(live / "tls.crt"), "--tls-key-file", str(live / "tls.key"),
        ca=ca.cert,
    )  # fmt: skip
    assert _served_common_name(node.address, ca.cert) == "scheduler"
    renewed = ca.issue("scheduler-renewed")
    # As a secret volume does: new files appear at once (rename), never half-written.
    shutil.copy(renewed.key, live / "tls.key.new")
    shutil.copy(renewed.cert, live / "tls.crt.new")
    (live / "tls.key.new").rename(live / "tls.key")
    (live / "tls.crt.new").rename(live / "tls.crt")
    deadline = time.monotonic() + 20
    while _served_common_name(node.address, ca.cert) != "scheduler-renewed":
        assert time.monotonic() < deadline, "the renewed certificate was never served"
        time.sleep(0.2)
    # gRPC clients handshake with the renewed certificate too.
    assert node.scheduler().Submit(request(), timeout=20).job_id


def test_mutual_tls_refuses_unknown_client_certificates(
    start_secure_scheduler, pki, tokens, tmp_path
) -> None:
    server, worker = pki["server"], pki["worker"]
    auth = write_auth_file(tmp_path / "auth.toml", tokens, worker_cert_cn="ssjf-worker")
    node = start_secure_scheduler(
        "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
        "--tls-client-ca-file", str(pki["ca"].cert), "--auth-file", str(auth),
        ca=pki["ca"].cert, client=pki["stranger"],
    )  # fmt: skip
    # No client certificate, or one from a CA the server does not trust: no connection.
    no_cert = node.gateway(client_cert_file="", client_key_file="")
    assert code_of(no_cert.Lease, lease_request()) == grpc.StatusCode.UNAVAILABLE
    rogue = pki["rogue_worker"]
    forged = node.gateway(client_cert_file=str(rogue.cert), client_key_file=str(rogue.key))
    assert code_of(forged.Lease, lease_request()) == grpc.StatusCode.UNAVAILABLE
    # A trusted certificate that names no principal, and no token: unauthenticated.
    stranger = node.gateway()
    assert code_of(stranger.Lease, lease_request()) == grpc.StatusCode.UNAUTHENTICATED
    # The worker's certificate is its credential: no token needed.
    certified = node.gateway(client_cert_file=str(worker.cert), client_key_file=str(worker.key))
    assert list(certified.Lease(lease_request(), timeout=20).jobs) == []
    # ...and it is a worker's credential: the client API refuses it.
    as_client = node.scheduler(client_cert_file=str(worker.cert), client_key_file=str(worker.key))
    assert code_of(as_client.Submit, request()) == grpc.StatusCode.PERMISSION_DENIED
    # A client with a trusted certificate still authenticates with its token.
    assert node.scheduler(tokens.acme).Submit(request(), timeout=20).job_id


# Principals ------------------------------------------------------------------------------


@pytest.fixture
def secured(start_secure_scheduler, tokens, tmp_path):
    auth = write_auth_file(tmp_path / "auth.toml", tokens)
    return start_secure_scheduler("--auth-file", str(auth))


def test_worker_gateway_refuses_client_and_missing_credentials(secured, tokens) -> None:
    assert code_of(secured.gateway().Lease, lease_request()) == grpc.StatusCode.UNAUTHENTICATED
    bad = secured.gateway("not-a-token")
    assert code_of(bad.Lease, lease_request()) == grpc.StatusCode.UNAUTHENTICATED
    as_client = secured.gateway(tokens.acme)
    assert code_of(as_client.Lease, lease_request()) == grpc.StatusCode.PERMISSION_DENIED
    assert list(secured.gateway(tokens.worker).Lease(lease_request(), timeout=20).jobs) == []


def test_client_api_refuses_worker_and_missing_credentials(secured, tokens) -> None:
    assert code_of(secured.scheduler().Submit, request()) == grpc.StatusCode.UNAUTHENTICATED
    as_worker = secured.scheduler(tokens.worker)
    assert code_of(as_worker.Submit, request()) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(as_worker.QueueStats, scheduler_pb2.QueueStatsRequest()) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # Health stays open for probes and load balancers.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(secured.channel())
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1


def test_the_fake_worker_attack_is_refused_and_training_data_stays_clean(
    secured, tokens, redis_url
) -> None:
    """The issue's attack: a client leases jobs to read prompts, reports fake tokens and a
    DONE outcome (poisoning the proxy model's data), or burns attempts. All refused."""
    victim = secured.scheduler(tokens.acme)
    job = victim.Submit(request("my secret prompt"), timeout=20)
    for token in (tokens.globex, tokens.acme, ""):
        attacker = secured.gateway(token)
        for _ in range(3):  # three lease attempts would have failed the job
            assert code_of(attacker.Lease, lease_request()) in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            )
        fake = scheduler_pb2.JobProgress(
            job_id=job.job_id,
            lease_id="guessed",
            tokens=[common_pb2.Token(index=0, text="pwned", token_id=1)],
            outcome=scheduler_pb2.JobOutcome(finish_reason=EOS, generated_tokens=1),
        )
        reports = iter([scheduler_pb2.WorkerReport(worker_id="evil", progress=[fake])])
        with pytest.raises(grpc.RpcError) as raised:
            list(attacker.Report(reports, timeout=20))
        assert raised.value.code() in (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
        )
    record = victim.GetJob(scheduler_pb2.GetJobRequest(job_id=job.job_id), timeout=20)
    assert record.state == common_pb2.JOB_STATE_QUEUED and record.attempts == 0
    # The authenticated worker serves it; only its outcome becomes training data.
    worker = secured.gateway(tokens.worker)
    [leased] = worker.Lease(lease_request(wait_ms=5000), timeout=20).jobs
    assert leased.job_id == job.job_id and leased.prompt == "my secret prompt"
    session = ReportSession(worker, "pool-worker")
    session.send(progress(leased, range(3), finish=EOS))
    session.close()
    events = list(victim.Stream(scheduler_pb2.StreamRequest(job_id=job.job_id), timeout=20))
    assert [e.token.text for e in events if e.HasField("token")] == ["t0 ", "t1 ", "t2 "]
    assert events[-1].summary.state == DONE
    stored = redis.Redis.from_url(redis_url, decode_responses=True)
    completions = stored.xrange(completions_key(LLM))
    assert [(fields["job_id"], fields["generated_tokens"]) for _, fields in completions] == [
        (job.job_id, "3")
    ]


# Tenants -------------------------------------------------------------------------------


def test_tenants_cannot_read_stream_or_cancel_each_others_jobs(secured, tokens) -> None:
    acme, globex = secured.scheduler(tokens.acme), secured.scheduler(tokens.globex)
    job_id = acme.Submit(request(), timeout=20).job_id
    get = scheduler_pb2.GetJobRequest(job_id=job_id)
    assert code_of(globex.GetJob, get) == grpc.StatusCode.NOT_FOUND
    stream = scheduler_pb2.StreamRequest(job_id=job_id)
    assert code_of(globex.Stream, stream) == grpc.StatusCode.NOT_FOUND
    cancel = scheduler_pb2.CancelRequest(job_id=job_id)
    assert code_of(globex.Cancel, cancel) == grpc.StatusCode.NOT_FOUND
    # The same answer as for a job that does not exist: nothing tells the job is there.
    missing = scheduler_pb2.GetJobRequest(job_id="00000000deadbeef")
    with pytest.raises(grpc.RpcError) as raised:
        globex.GetJob(missing, timeout=20)
    with pytest.raises(grpc.RpcError) as other:
        globex.GetJob(get, timeout=20)
    assert other.value.details().replace(job_id, "X") == raised.value.details().replace(
        "00000000deadbeef", "X"
    )
    # The owner still sees and cancels it.
    assert acme.GetJob(get, timeout=20).state == common_pb2.JOB_STATE_QUEUED
    assert acme.Cancel(cancel, timeout=20).cancelled
    assert acme.GetJob(get, timeout=20).state == CANCELLED


def test_client_request_ids_are_scoped_per_tenant(secured, tokens) -> None:
    acme, globex = secured.scheduler(tokens.acme), secured.scheduler(tokens.globex)
    first = acme.Submit(request("acme's prompt", client_request_id="req-1"), timeout=20)
    theirs = globex.Submit(request("globex's prompt", client_request_id="req-1"), timeout=20)
    assert not theirs.deduplicated and theirs.job_id != first.job_id
    again = acme.Submit(request("acme's prompt", client_request_id="req-1"), timeout=20)
    assert again.deduplicated and again.job_id == first.job_id
    job = globex.GetJob(scheduler_pb2.GetJobRequest(job_id=theirs.job_id), timeout=20)
    assert job.client_request_id == "req-1"


# Quotas --------------------------------------------------------------------------------


def _retry_after_ms(error: grpc.RpcError) -> int:
    trailers = dict(error.trailing_metadata() or ())
    return int(trailers["retry-after-ms"])


def _limit(error: grpc.RpcError) -> str:
    """Which limit the scheduler says was hit (for programs, like the HTTP front)."""
    return dict(error.trailing_metadata() or ())["ssjf-limit"]


def test_request_rate_quota_answers_then_recovers(start_secure_scheduler, tokens, tmp_path):
    auth = write_auth_file(
        tmp_path / "auth.toml", tokens, acme_limits="requests_per_s = 2\nburst = 3"
    )
    node = start_secure_scheduler("--auth-file", str(auth))
    acme = node.scheduler(tokens.acme)
    stats = scheduler_pb2.QueueStatsRequest()
    refused = None
    for _ in range(10):  # a burst of 3 then 2/s: a quick loop runs out
        try:
            acme.QueueStats(stats, timeout=20)
        except grpc.RpcError as error:
            refused = error
            break
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    wait_ms = _retry_after_ms(refused)
    assert 0 < wait_ms <= 1000 and "retry in" in refused.details()
    assert _limit(refused) == "requests_per_s"
    # Another tenant is not affected.
    node.scheduler(tokens.globex).QueueStats(stats, timeout=20)
    time.sleep(wait_ms / 1e3 + 0.05)
    acme.QueueStats(stats, timeout=20)


def test_queued_jobs_quota_answers_then_recovers(start_secure_scheduler, tokens, tmp_path):
    auth = write_auth_file(tmp_path / "auth.toml", tokens, acme_limits="max_queued_jobs = 2")
    node = start_secure_scheduler("--auth-file", str(auth))
    acme = node.scheduler(tokens.acme)
    first = acme.Submit(request("one", client_request_id="req-a"), timeout=20)
    acme.Submit(request("two"), timeout=20)
    with pytest.raises(grpc.RpcError) as raised:
        acme.Submit(request("three"), timeout=20)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _retry_after_ms(raised.value) > 0 and "unfinished jobs" in raised.value.details()
    assert _limit(raised.value) == "max_queued_jobs"
    # A deduplicated resubmission is not a new job: it is answered, not counted.
    again = acme.Submit(request("one", client_request_id="req-a"), timeout=20)
    assert again.deduplicated and again.job_id == first.job_id
    node.scheduler(tokens.globex).Submit(request("globex is not limited"), timeout=20)
    acme.Cancel(scheduler_pb2.CancelRequest(job_id=first.job_id), timeout=20)
    assert acme.Submit(request("three, again"), timeout=20).job_id


def test_open_streams_quota_answers_then_recovers(start_secure_scheduler, tokens, tmp_path):
    auth = write_auth_file(tmp_path / "auth.toml", tokens, acme_limits="max_streams = 1")
    node = start_secure_scheduler("--auth-file", str(auth))
    acme = node.scheduler(tokens.acme)
    job_id = acme.Submit(request(), timeout=20).job_id
    held = acme.Stream(scheduler_pb2.StreamRequest(job_id=job_id), timeout=60)
    time.sleep(0.5)  # the first stream is open on the server (no worker: it waits)
    second = acme.Stream(scheduler_pb2.StreamRequest(job_id=job_id), timeout=20)
    with pytest.raises(grpc.RpcError) as raised:
        list(second)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _retry_after_ms(raised.value) > 0 and _limit(raised.value) == "max_streams"
    held.cancel()
    deadline = time.monotonic() + 20
    while True:  # the server notices the closed stream shortly
        third = acme.Stream(scheduler_pb2.StreamRequest(job_id=job_id), timeout=3)
        try:
            list(third)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                break  # admitted: it waited for tokens until its deadline
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_http_front_passes_the_quotas_retry_hint_and_limit_on(
    start_secure_scheduler, tokens, tmp_path
) -> None:
    """Over its request rate, a tenant of the HTTP front gets the scheduler's own wait as
    Retry-After (whole seconds, rounded up) and the rate limit's code, not "queue full,
    retry in 1 s" (a client would retry at once, and be refused again)."""
    auth = write_auth_file(
        tmp_path / "auth.toml", tokens, acme_limits="requests_per_s = 0.2\nburst = 1"
    )
    node = start_secure_scheduler("--auth-file", str(auth))
    port = free_port()
    front = start_service(
        ["http", "--host", "127.0.0.1", "--port", str(port), "--scheduler", node.address]
    )
    try:
        wait_for_front(port, front)
        refused = None
        for _ in range(5):  # one request's burst, then one every 5 s: the second is refused
            models = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/models",
                headers={"Authorization": f"Bearer {tokens.acme}"},
            )
            try:
                with urllib.request.urlopen(models, timeout=20):
                    pass
            except urllib.error.HTTPError as error:
                refused = error
                break
        assert refused is not None and refused.code == 429
        assert int(refused.headers["Retry-After"]) in (4, 5)  # ~4.99 s, rounded up
        body = json.loads(refused.read())
        assert body["error"]["code"] == "rate_limit_exceeded", body
    finally:
        front.stop()


def test_priority_ceiling(start_secure_scheduler, tokens, tmp_path) -> None:
    auth = write_auth_file(tmp_path / "auth.toml", tokens, acme_limits="best_priority = 0")
    node = start_secure_scheduler("--auth-file", str(auth))
    acme = node.scheduler(tokens.acme)
    with pytest.raises(grpc.RpcError) as raised:
        acme.Submit(request(priority=-5), timeout=20)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "priority" in raised.value.details()
    assert acme.Submit(request(priority=0), timeout=20).job_id
    assert node.scheduler(tokens.globex).Submit(request(priority=-5), timeout=20).job_id


# Ports, reflection, metrics --------------------------------------------------------------


def _listed_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    return [service.name for reply in replies for service in reply.list_services_response.service]


def test_separate_worker_port_and_reflection_limits(
    start_secure_scheduler, tokens, tmp_path
) -> None:
    auth = write_auth_file(tmp_path / "auth.toml", tokens)
    node = start_secure_scheduler("--auth-file", str(auth), worker_port=True)
    assert node.worker_address != node.address
    # The client port does not serve the gateway at all, nor list it.
    on_client_port = node.gateway(tokens.worker, address=node.address)
    assert code_of(on_client_port.Lease, lease_request()) == grpc.StatusCode.UNIMPLEMENTED
    listed = _listed_services(node.channel(tokens.acme))
    assert "ssjf.v1.Scheduler" in listed and "ssjf.v1.WorkerGateway" not in listed
    # Reflection needs a credential when auth is on.
    with pytest.raises(grpc.RpcError) as raised:
        _listed_services(node.channel())
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The worker port serves workers.
    assert list(node.gateway(tokens.worker).Lease(lease_request(), timeout=20).jobs) == []
    assert "ssjf.v1.WorkerGateway" in _listed_services(
        node.channel(tokens.worker, node.worker_address)
    )


def test_reflection_off_and_metrics_bound_to_host(start_secure_scheduler) -> None:
    metrics_port = free_port()
    node = start_secure_scheduler("--reflection", "false", "--metrics-port", str(metrics_port))
    with pytest.raises(grpc.RpcError) as raised:
        _listed_services(node.channel())
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # /metrics listens on --host (127.0.0.1), not on every interface.
    deadline = time.monotonic() + 10
    while not (listening := listening_addresses(metrics_port)):
        assert time.monotonic() < deadline, "metrics server never listened"
        time.sleep(0.1)
    assert listening == {"127.0.0.1"}


# Redis over TLS with an ACL user -----------------------------------------------------------


def start_tls_redis(cert: Issued, ca: Path, acl: Path, url: str) -> subprocess.Popen:
    """redis-server with only a TLS port (``url``'s) and the users of ``acl``, answering
    ``url`` once it returns."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed")
    port = url.rsplit("@", 1)[1].split("/")[0].rsplit(":", 1)[1]
    process = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", port, "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert.cert), "--tls-key-file", str(cert.key),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--aclfile", str(acl), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return process
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("TLS redis-server did not start")
            time.sleep(0.1)


@pytest.fixture
def tls_redis(pki, tmp_path):
    """redis-server with only a TLS port and an ACL user ``ssjf`` (default user off)."""
    password = "s3cret-" + tmp_path.name
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default off\nuser ssjf on >{password} ~* &* +@all\n")
    ca = pki["ca"].cert
    url = f"rediss://ssjf:{password}@127.0.0.1:{free_port()}/0?ssl_ca_certs={ca}"
    process = start_tls_redis(pki["ca"].issue("redis"), ca, acl, url)
    yield url
    process.kill()
    process.wait()


def test_scheduler_uses_redis_over_tls_with_an_acl_user(
    start_secure_scheduler, tls_redis, tmp_path
) -> None:
    # Plaintext to the TLS port, or the wrong password, cannot talk to this Redis.
    with pytest.raises(redis.exceptions.RedisError):
        redis.Redis.from_url(
            tls_redis.replace("rediss://", "redis://").split("?")[0], socket_timeout=3
        ).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(tls_redis.replace("s3cret-", "wrong-")).ping()
    url_file = tmp_path / "redis-url"
    url_file.write_text(tls_redis)
    node = start_secure_scheduler("--redis-url-file", str(url_file), redis="redis://unused")
    job_id = node.scheduler().Submit(request(), timeout=20).job_id
    stored = redis.Redis.from_url(tls_redis, decode_responses=True)
    assert stored.hget(job_key(job_id), "state") == "QUEUED"
    # The password is nowhere on the process's command line.
    assert "s3cret" not in " ".join(node.service.process.args)


def test_export_completions_reads_the_redis_url_from_a_file(tls_redis, tmp_path) -> None:
    """The retraining data's exporter opens a password-protected Redis as the scheduler
    does: the URL from a file (a mounted secret), never on its command line."""
    stored = redis.Redis.from_url(tls_redis)
    stored.sadd(LLMS_KEY, LLM)
    stored.xadd(
        completions_key(LLM),
        {"prompt": "Name a tree.", "llm": LLM, "generated_tokens": 7, "finish_reason": "EOS"},
    )
    url_file = tmp_path / "redis-url"
    url_file.write_text(tls_redis + "\n")
    command = [sys.executable, "-m", "services.cli", "export-completions",
               "--redis-url-file", str(url_file), "--out", str(tmp_path / "data")]  # fmt: skip
    exported = subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={**os.environ, "REDIS_URL": "redis://not-this-one:1/0"},
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert "1 of 1 completions" in exported.stdout
    assert "s3cret" not in " ".join(command)


async def test_dial_aio_sends_the_token_on_every_kind_of_call(secured, tokens) -> None:
    """The worker's own channel helper: unary Lease and the bidirectional Report stream."""
    security = ChannelSecurity(token=tokens.worker)
    async with dial_aio(secured.worker_address, security) as channel:
        gateway = scheduler_pb2_grpc.WorkerGatewayStub(channel)
        assert list((await gateway.Lease(lease_request(), timeout=20)).jobs) == []
        report = gateway.Report(timeout=20)
        await report.write(scheduler_pb2.WorkerReport(worker_id="w"))
        directive = await report.read()
        assert list(directive.stop) == []
        await report.done_writing()


def test_generated_secrets_secure_a_scheduler(start_secure_scheduler, tmp_path) -> None:
    """``ssjf secrets`` output, used as SECURITY.md says: TLS, tenant and worker tokens."""
    out = tmp_path / "secrets"
    command = [sys.executable, "-m", "services.cli", "secrets", "--out", str(out)]
    made = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert made.returncode == 0, made.stderr
    assert oct((out / "scheduler.key").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert again.returncode == 1 and "--force" in again.stdout  # never overwritten by accident
    node = start_secure_scheduler(
        "--tls-cert-file", str(out / "scheduler.crt"), "--tls-key-file", str(out / "scheduler.key"),
        "--auth-file", str(out / "auth.toml"),
        ca=out / "ca.crt",
    )  # fmt: skip
    client_token = (out / "tokens" / "demo.token").read_text().strip()
    worker_token = (out / "tokens" / "worker.token").read_text().strip()
    assert node.scheduler(client_token).Submit(request(), timeout=20).job_id
    [job] = node.gateway(worker_token).Lease(lease_request(), timeout=20).jobs
    assert job.prompt == request().prompt
    assert code_of(node.gateway(client_token).Lease, lease_request()) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


def test_generated_redis_files_serve_a_tls_redis_with_the_password(tmp_path) -> None:
    """``ssjf secrets``' redis/ folder, as the Redis container mounts it: a real TLS
    redis-server on its certificate and ACL file (which holds only the password's digest)
    logs ``ssjf`` in with the password of ``redis-url``, and no one with another."""
    out = tmp_path / "secrets"
    command = [sys.executable, "-m", "services.cli", "secrets", "--out", str(out),
               "--redis-host", "localhost"]  # fmt: skip
    made = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert made.returncode == 0, made.stderr
    password = (out / "redis-password").read_text().strip()
    folder = out / "redis"
    assert password not in (folder / "users.acl").read_text()
    url = (out / "redis-url").read_text().strip().replace(":6379/", f":{free_port()}/")
    server = Issued(folder / "redis.crt", folder / "redis.key")
    process = start_tls_redis(server, folder / "ca.crt", folder / "users.acl", url)
    try:
        assert redis.Redis.from_url(url).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(url.replace(password, "not-" + password)).ping()
    finally:
        process.kill()
        process.wait()


async def test_a_rotated_token_file_is_used_without_restart(secured, tokens, tmp_path) -> None:
    token_file = tmp_path / "worker.token"
    token_file.write_text("revoked-or-wrong\n")
    security = ChannelSecurity(token="revoked-or-wrong", token_file=str(token_file))
    async with dial_aio(secured.worker_address, security) as channel:
        gateway = scheduler_pb2_grpc.WorkerGatewayStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await gateway.Lease(lease_request(), timeout=20)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token_file.write_text(tokens.worker + "\n")
        os.utime(token_file, ns=(time.time_ns(), time.time_ns() + 10**9))
        deadline = time.monotonic() + 10
        while True:
            try:
                await gateway.Lease(lease_request(), timeout=20)
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                assert time.monotonic() < deadline, "the new token was never sent"
                await asyncio.sleep(0.2)


def test_mutual_tls_on_the_worker_port_only(start_secure_scheduler, pki, tokens, tmp_path):
    server, worker = pki["server"], pki["worker"]
    auth = write_auth_file(tmp_path / "auth.toml", tokens, worker_cert_cn="ssjf-worker")
    node = start_secure_scheduler(
        "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
        "--worker-tls-client-ca-file", str(pki["ca"].cert), "--auth-file", str(auth),
        ca=pki["ca"].cert, worker_port=True,
    )  # fmt: skip
    # Clients need no certificate on the client port...
    assert node.scheduler(tokens.acme).Submit(request(), timeout=20).job_id
    # ...while the worker port takes no connection without one, even with a worker token.
    assert code_of(node.gateway(tokens.worker).Lease, lease_request()) == (
        grpc.StatusCode.UNAVAILABLE
    )
    certified = node.gateway(client_cert_file=str(worker.cert), client_key_file=str(worker.key))
    assert len(certified.Lease(lease_request(), timeout=20).jobs) == 1


def test_revoking_a_token_takes_effect_without_restart(start_secure_scheduler, tokens, tmp_path):
    auth = write_auth_file(tmp_path / "auth.toml", tokens)
    node = start_secure_scheduler("--auth-file", str(auth))
    acme = node.scheduler(tokens.acme)
    stats = scheduler_pb2.QueueStatsRequest()
    acme.QueueStats(stats, timeout=20)
    revoked = Tokens(acme=Tokens.new().acme, globex=tokens.globex, worker=tokens.worker)
    write_auth_file(tmp_path / "auth.toml.new", revoked).rename(auth)
    deadline = time.monotonic() + 20
    while True:
        try:
            acme.QueueStats(stats, timeout=20)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() < deadline, "the revoked token still works"
        time.sleep(0.2)
    node.scheduler(tokens.globex).QueueStats(stats, timeout=20)  # the others still work
    # A broken file keeps the last good credentials (and says why in the log).
    auth.write_text("this is [not toml")
    time.sleep(1.5)
    node.scheduler(tokens.globex).QueueStats(stats, timeout=20)
    assert "cannot reload credentials" in node.service.log()


def test_a_malformed_credentials_file_stops_the_scheduler_with_a_reason(
    redis_url, tmp_path
) -> None:
    auth = tmp_path / "auth.toml"
    auth.write_text('[[clients]]\ntenant = "has space"\ntoken_sha256 = "00"\n')
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "scheduler", "--port", str(free_port()),
         "--host", "127.0.0.1", "--auth-file", str(auth)],
        cwd=REPO_ROOT, env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--auth-file" in result.stderr and "tenant 'has space'" in result.stderr


def test_http_front_over_https_forwards_the_callers_token(
    start_secure_scheduler, pki, tokens, tmp_path
) -> None:
    """HTTPS in front, TLS behind, and the caller's own token decides (the front has none)."""
    server = pki["server"]
    auth = write_auth_file(tmp_path / "auth.toml", tokens)
    node = start_secure_scheduler(
        "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
        "--auth-file", str(auth), ca=pki["ca"].cert,
    )  # fmt: skip
    front_cert = pki["ca"].issue("http")
    port = free_port()
    front = start_service(
        ["http", "--host", "127.0.0.1", "--port", str(port), "--scheduler", node.address,
         "--tls-cert-file", str(front_cert.cert), "--tls-key-file", str(front_cert.key)],
        env={"SSJF_TLS_CA_FILE": str(pki["ca"].cert), "SSJF_TOKEN": tokens.worker},
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(pki["ca"].cert))

    def get(path: str, token: str = "", body: dict | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        request = urllib.request.Request(
            f"https://127.0.0.1:{port}{path}", data=data, headers=headers
        )
        try:
            with urllib.request.urlopen(request, context=context, timeout=20) as reply:
                return reply.status
        except urllib.error.HTTPError as error:
            return error.code

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert get("/health") == 200
                break
            except (urllib.error.URLError, ConnectionError, AssertionError):
                assert time.monotonic() < deadline, front.log()
                time.sleep(0.3)
        assert get("/v1/models", tokens.acme) == 200
        # No token, or a worker's: refused by the scheduler, whatever the front's env holds.
        assert get("/v1/models") == 401
        assert get("/v1/models", tokens.worker) == 403
        # The same for a chat completion, the call an application makes.
        chat = {"model": "vicuna-13b", "messages": [{"role": "user", "content": "Hi"}]}
        assert get("/v1/chat/completions", body=chat) == 401
        assert get("/v1/chat/completions", tokens.worker, body=chat) == 403
    finally:
        front.stop()
