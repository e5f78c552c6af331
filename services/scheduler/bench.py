"""Scheduler benchmark (``make bench-scheduler``): how much the scheduler adds per job.

Starts its own redis-server and one scheduler replica (a real ``ssjf scheduler`` process, no
predictor: its latency is the predictor's benchmark), then measures from a gRPC client:

1. submit-to-dispatch latency with idle workers: workers long-poll Lease; the client submits
   one job at a time; latency is from calling Submit to a worker's Lease returning that job;
2. sustained Submit throughput of the one replica (many calls in flight, no workers);
3. dispatch latency with 1e3, 1e5 and 1e6 jobs queued: the queue is filled through the real
   submit script (pipelined), then Lease RPCs (and the bare claim script) are timed while
   one job is submitted per lease, so the depth stays put;
4. raw Redis on the same server: redis-benchmark ZADD and ZPOPMIN, one client (latency) and
   50 clients (throughput).

Writes a JSON file and a PNG plot, and prints a table. Leased jobs are never finished (the
lease TTL is an hour), so no reaper or worker traffic disturbs the timings.

    .venv/bin/python -m services.scheduler.bench --out bench/results/scheduler.json
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.health import wait_for_serving
from services.common.machine import describe_machine
from services.common.net import free_port
from services.common.paths import CHECKOUT_ROOT
from services.common.redis_store import LocalRedisServer, connect
from services.pb import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.core import new_job_id
from services.scheduler.keys import arrivals_key, queue_key
from services.scheduler.models import JobRecord, JobState, SamplingParams
from services.scheduler.store import JobStore, StoreSettings

LLM = "bench-llm"
FILL_BATCH = 5_000


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(sample * 1e3 for sample in samples_s)
    return {
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
        "mean_ms": statistics.fmean(ms),
        "n": len(ms),
    }


class Stack:
    """redis-server and one scheduler process, both on free ports, both stopped on exit."""

    def __init__(self) -> None:
        self.redis = LocalRedisServer()
        self.redis_url = self.redis.url
        self.address = f"127.0.0.1:{free_port()}"
        self.scheduler: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.redis.start()
        self.scheduler = subprocess.Popen(
            [
                sys.executable, "-m", "services.cli", "--log-level", "warning",
                "scheduler",
                "--host", "127.0.0.1",
                "--port", self.address.rsplit(":", 1)[1],
                "--redis-url", self.redis_url,
                "--max-queue-depth", "0",
                "--lease-ttl-s", "3600",
                "--default-llm", LLM,
            ],
            cwd=CHECKOUT_ROOT,
        )  # fmt: skip
        wait_for_serving(self.address, timeout=60, alive=lambda: self.scheduler.poll() is None)

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.terminate()
            try:
                self.scheduler.wait(15)
            except subprocess.TimeoutExpired:
                self.scheduler.kill()
        self.redis.kill()


def _submit_request(i: int, predicted_hint: int = 0) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(llm=LLM, prompt=f"bench prompt {i} {predicted_hint}")


async def submit_to_dispatch(address: str, samples: int, workers: int) -> dict[str, float]:
    """Latency from Submit to the Lease of an idle, long-polling worker returning the job."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
        gateway = scheduler_pb2_grpc.WorkerGatewayStub(channel)
        dispatched: dict[str, asyncio.Future[float]] = {}
        stop = asyncio.Event()

        async def worker(index: int) -> None:
            while not stop.is_set():
                reply = await gateway.Lease(
                    scheduler_pb2.LeaseRequest(
                        worker_id=f"bench-worker-{index}", llms=[LLM], max_jobs=1, wait_ms=1000
                    )
                )
                now = time.perf_counter()
                for job in reply.jobs:
                    dispatched[job.prompt].set_result(now)

        tasks = [asyncio.create_task(worker(i)) for i in range(workers)]
        await asyncio.sleep(0.5)  # every worker is blocked in its long poll
        latencies = []
        for i in tqdm(range(samples), desc="submit-to-dispatch", unit="job"):
            request = _submit_request(i)
            dispatched[request.prompt] = asyncio.get_running_loop().create_future()
            started = time.perf_counter()
            await scheduler.Submit(request)
            latencies.append(await dispatched[request.prompt] - started)
        stop.set()
        await asyncio.gather(*tasks)
    return _percentiles(latencies)


async def call_throughput(address: str, seconds: float, in_flight: int, rpc: str) -> dict:
    """Sustained calls per second of one replica, ``in_flight`` at a time: ``Submit``, or the
    health ``Check`` (no work at all: the ceiling of Python gRPC on this machine)."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def caller(offset: int) -> None:
            i = offset
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                if rpc == "Submit":
                    await scheduler.Submit(_submit_request(i, i % 997))
                else:
                    await health.Check(health_pb2.HealthCheckRequest())
                latencies.append(time.perf_counter() - started)
                i += in_flight

        started = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(in_flight)))
        elapsed = time.perf_counter() - started
    return {
        "rpc": rpc,
        "calls_per_s": len(latencies) / elapsed,
        "in_flight": in_flight,
        "seconds": elapsed,
        **_percentiles(latencies),
    }


def _bench_record(i: int, now: float) -> JobRecord:
    return JobRecord(
        job_id=new_job_id(LLM),
        client_request_id="",
        llm=LLM,
        state=JobState.QUEUED,
        priority=0,
        predicted_output_tokens=float(50 + i % 1000),
        prediction_fallback=False,
        predictor_version="bench",
        policy="ssjf",
        score=float(50 + (i * 7919) % 1000) + now,
        sampling=SamplingParams(),
        prompt=f"queued prompt {i}",
        submitted_at=now,
        queued_at=now,
    )


async def fill_queue(store: JobStore, target: int) -> None:
    """Top the queue up to ``target`` jobs through the real submit script, pipelined."""
    current = await store.redis.zcard(queue_key(LLM))
    missing = target - current
    with tqdm(total=missing, desc=f"filling queue to {target:.0e}", unit="job") as progress:
        while missing > 0:
            batch = min(FILL_BATCH, missing)
            now = time.time()
            # Concurrent submits share pipelined round trips (see store.BatchedScript).
            await asyncio.gather(
                *(
                    store.submit(
                        _bench_record(current + i, now), deadline_at=0.0, max_queue_depth=0
                    )
                    for i in range(batch)
                )
            )
            current += batch
            missing -= batch
            progress.update(batch)


async def dispatch_at_depth(
    address: str, store: JobStore, depth: int, samples: int
) -> dict[str, object]:
    """Lease RPC and bare claim-script latency with ``depth`` jobs queued."""
    await fill_queue(store, depth)
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
        gateway = scheduler_pb2_grpc.WorkerGatewayStub(channel)
        lease_rpc, claim_script = [], []
        lease = scheduler_pb2.LeaseRequest(worker_id="bench", llms=[LLM], max_jobs=1)
        for i in tqdm(range(samples), desc=f"dispatch at {depth:.0e}", unit="lease"):
            await scheduler.Submit(_submit_request(i, i % 997))
            started = time.perf_counter()
            reply = await gateway.Lease(lease)
            lease_rpc.append(time.perf_counter() - started)
            assert len(reply.jobs) == 1
            await scheduler.Submit(_submit_request(i, i % 991))
            started = time.perf_counter()
            jobs = await store.claim("bench", [LLM], max_jobs=1, now=time.time(), max_wait_s=300)
            claim_script.append(time.perf_counter() - started)
            assert len(jobs) == 1
        # Redis's own time per claim script (no client, no network): the flatness check.
        await store.redis.config_resetstat()
        for _ in range(min(samples, depth // 2)):
            await store.claim("bench", [LLM], max_jobs=1, now=time.time(), max_wait_s=300)
        redis_usec = (await store.redis.info("commandstats"))["cmdstat_evalsha"]["usec_per_call"]
    queued = await store.redis.zcard(queue_key(LLM))
    return {
        "claim_script_redis_usec_per_call": redis_usec,
        "depth": depth,
        "queued_after": queued,
        "lease_rpc": _percentiles(lease_rpc),
        "claim_script": _percentiles(claim_script),
    }


def redis_benchmark(port: int, requests: int) -> list[dict[str, object]]:
    """redis-benchmark ZADD and ZPOPMIN on the same server, 1 and 50 clients."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return []
    rows = []
    for clients in (1, 50):
        output = subprocess.run(
            [
                binary,
                "-p",
                str(port),
                "-t",
                "zadd,zpopmin",
                "-n",
                str(requests),
                "-c",
                str(clients),
                "-r",
                "1000000",
                "--csv",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for row in csv.DictReader(io.StringIO(output)):
            rows.append(
                {
                    "test": row["test"],
                    "clients": clients,
                    "rps": float(row["rps"]),
                    "p50_ms": float(row["p50_latency_ms"]),
                    "p99_ms": float(row["p99_latency_ms"]),
                }
            )
    return rows


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [row["depth"] for row in results["dispatch_by_depth"]]
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, label in (("lease_rpc", "Lease RPC"), ("claim_script", "claim script (Redis)")):
        for stat, style in (("p50_ms", "-o"), ("p99_ms", "--o")):
            values = [row[name][stat] for row in results["dispatch_by_depth"]]
            axes.plot(depths, values, style, label=f"{label} {stat[:3]}")
    axes.set_xscale("log")
    axes.set_xlabel("jobs queued")
    axes.set_ylabel("latency (ms)")
    axes.set_ylim(bottom=0)
    axes.set_title("SSJF dispatch latency vs queue depth")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def print_table(results: dict) -> None:
    s2d = results["submit_to_dispatch"]
    print(
        "\nSSJF scheduler benchmark (one replica, no predictor); load average "
        f"{results['load_average_at_start'][0]:.1f} at start, "
        f"{results['load_average_at_end'][0]:.1f} at end on {results['machine']['cpus']} CPUs"
    )
    print(f"{'measure':<44}{'p50 ms':>9}{'p99 ms':>9}{'per s':>10}")
    print(f"{'submit-to-dispatch, idle workers':<44}{s2d['p50_ms']:>9.2f}{s2d['p99_ms']:>9.2f}")
    for row in results["throughput"]:
        label = f"{row['rpc']}, {row['in_flight']} in flight"
        print(f"{label:<44}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['calls_per_s']:>10.0f}")
    for row in results["dispatch_by_depth"]:
        for name in ("lease_rpc", "claim_script"):
            label = f"{name.replace('_', ' ')} at {row['depth']:.0e} queued"
            print(f"{label:<44}{row[name]['p50_ms']:>9.3f}{row[name]['p99_ms']:>9.3f}")
        label = f"  inside Redis, mean, at {row['depth']:.0e} queued"
        print(f"{label:<44}{row['claim_script_redis_usec_per_call'] / 1e3:>9.3f}")
    for row in results["redis_benchmark"]:
        label = f"redis-benchmark {row['test']}, {row['clients']} client(s)"
        print(f"{label:<44}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{row['rps']:>10.0f}")


async def run(args: argparse.Namespace) -> dict:
    stack = Stack()
    stack.start()
    redis = connect(stack.redis_url)
    try:
        store = JobStore(
            redis,
            StoreSettings(
                job_ttl_s=3600, lease_ttl_s=3600, max_attempts=3, completions_maxlen=1000
            ),
        )
        results: dict = {
            "command": " ".join(["python -m services.scheduler.bench", *sys.argv[1:]]),
            "machine": describe_machine(),
            "submit_to_dispatch": await submit_to_dispatch(
                stack.address, args.samples, args.workers
            ),
            "load_average_at_start": os.getloadavg(),
            # health.Check does no work: the floor of Python gRPC on this machine, for scale.
            "throughput": [
                await call_throughput(stack.address, args.seconds, in_flight, rpc)
                for rpc, in_flight in (
                    ("Submit", args.in_flight),
                    ("health.Check", args.in_flight),
                    ("health.Check", 1),
                )
            ],
        }
        await redis.delete(queue_key(LLM), arrivals_key(LLM))
        results["dispatch_by_depth"] = [
            await dispatch_at_depth(stack.address, store, depth, args.samples)
            for depth in args.depths
        ]
        results["redis_benchmark"] = redis_benchmark(stack.redis.port, args.redis_requests)
        results["load_average_at_end"] = os.getloadavg()
    finally:
        await redis.aclose()
        stack.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/scheduler.json"))
    parser.add_argument("--samples", type=int, default=1000, help="timed jobs per latency")
    parser.add_argument("--workers", type=int, default=4, help="idle long-polling workers")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    parser.add_argument("--in-flight", type=int, default=64, help="concurrent Submit calls")
    parser.add_argument(
        "--depths",
        type=lambda text: [int(float(x)) for x in text.split(",")],
        default=[1_000, 100_000, 1_000_000],
        help="queue depths, e.g. 1e3,1e6",
    )
    parser.add_argument("--redis-requests", type=int, default=200_000)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, args.out.with_suffix(".png"))
    print_table(results)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
