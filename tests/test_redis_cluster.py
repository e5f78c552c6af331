"""The scheduler, unchanged but for REDIS_URL, on a real 3-master Redis Cluster.

Three ``redis-server --cluster-enabled yes`` processes on free ports, joined by
``redis-cli --cluster create``; a scheduler on ``redis+cluster://`` and one worker serving
six LLMs whose queues hash to all three masters. Every job streams to the end, a cancel
works, and each master holds the queues and jobs of its own LLMs only.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from redis.asyncio.connection import SSLConnection

from services.common.net import free_port
from services.common.redis_store import connect, node_client
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.core import new_job_id
from services.scheduler.keys import events_key, job_key, queue_key
from services.scheduler.streams import SlotStreamHubs
from tests.helpers import start_service, wait_for_health

pytestmark = pytest.mark.slow


class RedisClusterProcesses:
    """Three masters, no replicas, all 16384 slots assigned. With ``user`` (name, password),
    every node requires that ACL user and the default user is off."""

    def __init__(self, masters: int = 3, user: tuple[str, str] | None = None) -> None:
        self.user = user
        self.dir = Path(tempfile.mkdtemp(prefix="ssjf-cluster-"))
        self.ports = [free_port() for _ in range(masters)]
        # The cluster bus defaults to port + 10000, which a free port may not have room for.
        self.bus_ports = [free_port() for _ in range(masters)]
        self.processes: list[subprocess.Popen] = []

    def client(self, port: int) -> redis.Redis:
        username, password = self.user or (None, None)
        return redis.Redis(port=port, username=username, password=password)

    def start(self) -> None:
        acl, cli_auth = [], []
        if self.user is not None:
            name, password = self.user
            acl = ["--user", "default", "off",
                   "--user", name, "on", f">{password}", "~*", "&*", "+@all"]  # fmt: skip
            cli_auth = ["--user", name, "--pass", password]
        for port, bus_port in zip(self.ports, self.bus_ports, strict=True):
            node_dir = self.dir / str(port)
            node_dir.mkdir()
            self.processes.append(
                subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                     "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                     "--cluster-config-file", "nodes.conf",
                     "--dir", str(node_dir), "--save", "", "--appendonly", "no", *acl],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        for port in self.ports:
            _wait(lambda port=port: self.client(port).ping(), f"redis on {port}")
        subprocess.run(
            ["redis-cli", *cli_auth, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        for port in self.ports:
            _wait(
                lambda port=port: (
                    b"cluster_state:ok" in self.client(port).execute_command("CLUSTER", "INFO")
                ),
                f"cluster state ok on {port}",
            )

    def master_of_slot(self, slot: int) -> int:
        for start, end, (_, port, *_rest), *_ in self.client(self.ports[0]).execute_command(
            "CLUSTER", "SLOTS"
        ):
            if start <= slot <= end:
                return port
        raise AssertionError(f"slot {slot} is not served")

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait(ready, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except redis.RedisError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _running_cluster(user: tuple[str, str] | None = None) -> Iterator[RedisClusterProcesses]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server and redis-cli (apt-get install redis-server)")
    cluster = RedisClusterProcesses(user=user)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcesses]:
    yield from _running_cluster()


@pytest.fixture(scope="module")
def acl_cluster() -> Iterator[RedisClusterProcesses]:
    yield from _running_cluster(user=("ssjf", "cluster-secret"))


def llms_on_every_master(cluster: RedisClusterProcesses, per_master: int = 2) -> dict[str, int]:
    """LLM name -> the master port its queue lives on, ``per_master`` LLMs on each master."""
    chosen: dict[str, int] = {}
    counts = dict.fromkeys(cluster.ports, 0)
    probe = cluster.client(cluster.ports[0])
    for n in range(1000):
        llm = f"llm-{n}"
        port = cluster.master_of_slot(probe.cluster("KEYSLOT", queue_key(llm)))
        if counts[port] < per_master:
            chosen[llm] = port
            counts[port] += 1
        if all(count == per_master for count in counts.values()):
            return chosen
    raise AssertionError(f"could not place LLMs on every master: {counts}")


def test_a_job_and_its_queue_share_one_slot_and_llms_spread():
    from redis.crc import key_slot

    from services.scheduler import keys
    from services.scheduler.core import new_job_id

    slots = set()
    for llm in ("vicuna-13b", "gpt4_0314", "meta-llama/Llama-3.1-8B-Instruct", "x"):
        job_id = new_job_id(llm)
        names = [
            keys.job_key(job_id),
            keys.events_key(job_id),
            keys.idempotency_key(llm, "client-1"),
            *(getattr(keys, name)(llm) for name in keys.PER_LLM),
        ]
        assert len({key_slot(name.encode()) for name in names}) == 1, names
        assert keys.job_id_of_key(keys.job_key(job_id)) == job_id
        slots.add(key_slot(keys.queue_key(llm).encode()))
    assert len(slots) == 4


def test_scheduler_on_a_three_master_cluster_spreads_llm_queues(cluster: RedisClusterProcesses):
    placement = llms_on_every_master(cluster)
    llms = sorted(placement)
    url = f"redis+cluster://127.0.0.1:{cluster.ports[0]}"
    scheduler_port, worker_port = free_port(), free_port()
    scheduler = start_service(
        ["scheduler", "--port", str(scheduler_port), "--host", "127.0.0.1",
         "--predictor", f"127.0.0.1:{free_port()}", "--predictor-timeout-ms", "50",
         "--default-llm", llms[0], "--reap-interval-s", "0.5"],
        {"REDIS_URL": url},
    )  # fmt: skip
    worker = None
    try:
        wait_for_health(f"127.0.0.1:{scheduler_port}", timeout=120)
        channel = grpc.insecure_channel(f"127.0.0.1:{scheduler_port}")
        stub = scheduler_pb2_grpc.SchedulerStub(channel)

        def submit(llm: str, tokens: int) -> str:
            request = scheduler_pb2.GenerateRequest(
                llm=llm,
                prompt=f"a question for {llm}",
                sampling=common_pb2.SamplingParams(replay_output_tokens=tokens),
            )
            return stub.Submit(request, timeout=60).job_id

        # Queued before any worker exists: every LLM's queue fills on its own master.
        jobs = {llm: [submit(llm, 6 + i) for i in range(3)] for llm in llms}
        doomed = submit(llms[-1], 5000)
        cancel = stub.Cancel(scheduler_pb2.CancelRequest(job_id=doomed), timeout=30)
        assert cancel.cancelled and cancel.state == common_pb2.JOB_STATE_CANCELLED

        for llm, port in placement.items():
            node = redis.Redis(port=port)
            assert node.zcard(queue_key(llm)) == 3, f"{llm}'s queue is not on master {port}"
            for job_id in jobs[llm]:
                assert node.exists(job_key(job_id)), f"job {job_id} is not beside its queue"
        stats = stub.QueueStats(scheduler_pb2.QueueStatsRequest(), timeout=30)
        assert {s.llm: s.queued for s in stats.queues} == dict.fromkeys(llms, 3)

        # One worker serving all six LLMs leases from all three masters.
        worker = start_service(
            ["worker", "--port", str(worker_port), "--host", "127.0.0.1",
             "--scheduler", f"127.0.0.1:{scheduler_port}", "--model", "tiny-llama",
             "--served-model-name", ",".join(llms), "--max-batch-size", "4"],
        )  # fmt: skip

        def stream(job_id: str) -> list[scheduler_pb2.JobEvent]:
            return list(stub.Stream(scheduler_pb2.StreamRequest(job_id=job_id), timeout=300))

        all_jobs = [(llm, i, job_id) for llm in llms for i, job_id in enumerate(jobs[llm])]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda job: stream(job[2]), all_jobs))
        for (llm, i, job_id), events in zip(all_jobs, results, strict=True):
            indexes = [e.token.index for e in events if e.WhichOneof("event") == "token"]
            assert indexes == list(range(6 + i)), f"{llm} job {job_id}: {indexes}"
            assert events[-1].summary.state == common_pb2.JOB_STATE_DONE
        stats = stub.QueueStats(scheduler_pb2.QueueStatsRequest(), timeout=30)
        completed = {s.llm: s.counters.get("completed", 0) for s in stats.queues}
        assert completed == dict.fromkeys(llms, 3), completed
        assert sum(redis.Redis(port=port).dbsize() > 0 for port in cluster.ports) == 3
        channel.close()
    finally:
        if worker is not None:
            worker.stop()
        assert scheduler.stop() == 0, scheduler.log()


def test_per_node_stream_clients_connect_like_the_cluster_client() -> None:
    """The stream readers' per-node clients (SlotStreamHubs) carry the URL's user, password
    and TLS settings, and every client retries a dead connection the same way."""
    cluster = connect("rediss+cluster://alice:s3cret@127.0.0.1:7000?ssl_cert_reqs=none")
    single = connect("redis://127.0.0.1:7000").connection_pool.connection_kwargs["retry"]
    assert cluster.retry.get_retries() == single.get_retries() == 6
    [node] = cluster.nodes_manager.startup_nodes.values()
    pool = node_client(node).connection_pool
    assert pool.connection_class is SSLConnection
    options = pool.connection_kwargs
    assert (options["host"], options["port"]) == ("127.0.0.1", 7000)
    assert (options["username"], options["password"]) == ("alice", "s3cret")
    assert options["ssl_cert_reqs"] == "none" and options["decode_responses"]
    assert options["retry"].get_retries() == cluster.retry.get_retries()


def test_streams_are_read_from_every_master_of_a_cluster_with_acls(
    acl_cluster: RedisClusterProcesses,
) -> None:
    """A cluster whose default user is off: the multiplexed stream readers, one per slot,
    authenticate as the URL's user on each master and deliver every stream's entries."""
    name, password = acl_cluster.user or ("", "")
    llms = sorted(llms_on_every_master(acl_cluster, per_master=1))

    async def scenario() -> None:
        client = connect(f"redis+cluster://{name}:{password}@127.0.0.1:{acl_cluster.ports[0]}")
        hubs = SlotStreamHubs(client)
        try:
            await client.initialize()  # the slot map (the store's first command loads it)
            streams = [events_key(new_job_id(llm)) for llm in llms]
            subscriptions = [hubs.subscribe(stream) for stream in streams]
            for stream in streams:
                await client.xadd(stream, {"k": "t", "stream": stream})
            for subscription in subscriptions:
                batch = await asyncio.wait_for(subscription.queue.get(), timeout=30)
                assert not isinstance(batch, Exception), batch
                assert [fields["stream"] for _, fields in batch] == [subscription.stream]
        finally:
            await hubs.close()
            await client.aclose()

    asyncio.run(scenario())
