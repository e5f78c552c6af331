"""What TLS and authentication cost (``make bench-security``).

Starts one redis-server and two real ``ssjf scheduler`` processes on it, side by side on
this machine, in this run: one plaintext with auth off (as ``ssjf up``), one with TLS and
``--auth-file`` (bearer tokens, tenants, the quota interceptor with its default limits off).
Certificates come from a CA made for the run. Rounds alternate the two, so both meet the
same machine load. Per round and per mode it measures, from a gRPC client in this process:

1. **Submit**: ``--submits`` calls one after another on one channel: client latency, and the
   scheduler process's CPU time per call (from /proc: robust to other load on the machine);
2. **streamed token**: ``--stream-jobs`` finished jobs of ``--tokens`` tokens each (reported
   by this process acting as an authenticated worker), each streamed back with Stream:
   client time and scheduler CPU per token;
3. **connection set-up**: a new channel's first call (a TCP + HTTP/2, and TLS, handshake).

Reports each number's mean over rounds with a 95% confidence interval (t), the overhead
(secure - plain) per Submit and per token, the load average at start and end, and how many
calls stand behind each number; writes JSON.

    .venv/bin/python -m services.scheduler.security_bench --out bench/results/security.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

from services.common.channels import dial_aio
from services.common.config import REDIS_URL_ENV
from services.common.health import wait_for_serving
from services.common.machine import describe_machine
from services.common.net import free_port
from services.common.paths import CHECKOUT_ROOT
from services.common.pki import CertificateAuthority, new_token
from services.common.principals import token_digest
from services.common.redis_store import LocalRedisServer
from services.common.tls import ChannelSecurity
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc

SUBMIT_LLM = "bench-submit"
STREAM_LLM = "bench-stream"
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


@dataclass
class Scheduler:
    name: str
    process: subprocess.Popen[bytes]
    address: str
    client: ChannelSecurity
    worker: ChannelSecurity

    def cpu_s(self) -> float:
        return _cpu_s(self.process.pid)


def _start(name: str, redis_url: str, flags: list[str], client, worker) -> Scheduler:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--log-level", "warning", "scheduler",
         "--host", "127.0.0.1", "--port", str(port), "--lease-ttl-s", "3600",
         "--max-queue-depth", "0", *flags],
        cwd=CHECKOUT_ROOT, env={**os.environ, REDIS_URL_ENV: redis_url},
    )  # fmt: skip
    node = Scheduler(name, process, f"127.0.0.1:{port}", client, worker)
    wait_for_serving(node.address, 60, alive=lambda: process.poll() is None, security=client)
    return node


async def _submits(node: Scheduler, count: int) -> dict[str, float]:
    async with dial_aio(node.address, node.client) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        request = scheduler_pb2.GenerateRequest(llm=SUBMIT_LLM, prompt="How long is a job?")
        await stub.Submit(request, timeout=30)  # connection up before timing
        cpu, latencies = node.cpu_s(), []
        for _ in range(count):
            started = time.perf_counter()
            await stub.Submit(request, timeout=30)
            latencies.append(time.perf_counter() - started)
        cpu = node.cpu_s() - cpu
    return {
        "latency_p50_us": statistics.median(latencies) * 1e6,
        "latency_mean_us": statistics.fmean(latencies) * 1e6,
        "server_cpu_us": cpu / count * 1e6,
    }


async def _finished_jobs(node: Scheduler, jobs: int, tokens: int) -> list[str]:
    """``jobs`` jobs of ``tokens`` tokens each, leased and reported by this process."""
    async with (
        dial_aio(node.address, node.client) as client_channel,
        dial_aio(node.address, node.worker) as worker_channel,
    ):
        scheduler = scheduler_pb2_grpc.SchedulerStub(client_channel)
        gateway = scheduler_pb2_grpc.WorkerGatewayStub(worker_channel)
        request = scheduler_pb2.GenerateRequest(llm=STREAM_LLM, prompt="stream me")
        ids = [(await scheduler.Submit(request, timeout=30)).job_id for _ in range(jobs)]
        leased = []
        while len(leased) < jobs:
            reply = await gateway.Lease(
                scheduler_pb2.LeaseRequest(
                    worker_id="bench", llms=[STREAM_LLM], max_jobs=jobs, wait_ms=1000
                ),
                timeout=30,
            )
            leased += reply.jobs
        report = gateway.Report(timeout=120)
        for job in leased:
            for start in range(0, tokens, 256):
                batch = [
                    common_pb2.Token(index=i, text=f" tok{i}", token_id=i)
                    for i in range(start, min(tokens, start + 256))
                ]
                progress = scheduler_pb2.JobProgress(
                    job_id=job.job_id, lease_id=job.lease_id, tokens=batch
                )
                if start + 256 >= tokens:
                    progress.outcome.CopyFrom(
                        scheduler_pb2.JobOutcome(
                            finish_reason=common_pb2.FINISH_REASON_LENGTH, generated_tokens=tokens
                        )
                    )
                await report.write(
                    scheduler_pb2.WorkerReport(worker_id="bench", progress=[progress])
                )
                await report.read()
        await report.done_writing()
    return ids


async def _streams(node: Scheduler, job_ids: list[str], tokens: int) -> dict[str, float]:
    async with dial_aio(node.address, node.client) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        await stub.QueueStats(scheduler_pb2.QueueStatsRequest(), timeout=30)
        cpu, started = node.cpu_s(), time.perf_counter()
        received = 0
        for job_id in job_ids:
            async for event in stub.Stream(scheduler_pb2.StreamRequest(job_id=job_id), timeout=60):
                received += event.HasField("token")
        elapsed, cpu = time.perf_counter() - started, node.cpu_s() - cpu
    assert received == tokens * len(job_ids), received
    return {
        "client_us_per_token": elapsed / received * 1e6,
        "server_cpu_us_per_token": cpu / received * 1e6,
    }


async def _connect(node: Scheduler, count: int) -> dict[str, float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        async with dial_aio(node.address, node.client) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            await stub.QueueStats(scheduler_pb2.QueueStatsRequest(), timeout=30)
        times.append(time.perf_counter() - started)
    return {"first_call_p50_ms": statistics.median(times) * 1e3}


def _interval(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95_low": mean, "ci95_high": mean, "rounds": len(values)}
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "rounds": len(values)}


async def run(args: argparse.Namespace) -> dict:
    load_start = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="ssjf-security-bench-"))
    ca = CertificateAuthority(workdir, "bench-ca")
    cert = ca.issue("scheduler")
    client_token, worker_token = new_token(), new_token()
    auth = workdir / "auth.toml"
    auth.write_text(
        f'[[clients]]\ntenant = "bench"\ntoken_sha256 = "{token_digest(client_token)}"\n'
        f'[[workers]]\nname = "bench"\ntoken_sha256 = "{token_digest(worker_token)}"\n'
    )
    redis = LocalRedisServer()
    redis.start()
    tls = {"tls": True, "ca_file": str(ca.cert)}
    nodes = []
    try:
        nodes = [
            _start("plaintext, auth off", redis.url, [], ChannelSecurity(), ChannelSecurity()),
            _start(
                "TLS + tokens",
                redis.url,
                ["--tls-cert-file", str(cert.cert), "--tls-key-file", str(cert.key),
                 "--auth-file", str(auth)],
                ChannelSecurity(**tls, token=client_token),
                ChannelSecurity(**tls, token=worker_token),
            ),
        ]  # fmt: skip
        rounds: dict[str, list[dict[str, float]]] = {node.name: [] for node in nodes}
        for index in range(args.rounds):
            order = nodes if index % 2 == 0 else nodes[::-1]
            for node in order:
                job_ids = await _finished_jobs(node, args.stream_jobs, args.tokens)
                result = {
                    **await _submits(node, args.submits),
                    **await _streams(node, job_ids, args.tokens),
                    **await _connect(node, args.connects),
                }
                rounds[node.name].append(result)
                print(
                    f"round {index + 1}/{args.rounds} {node.name:>20}: Submit p50 "
                    f"{result['latency_p50_us']:.0f} us, server CPU "
                    f"{result['server_cpu_us']:.0f} us/Submit, "
                    f"{result['server_cpu_us_per_token']:.2f} us/token",
                    flush=True,
                )
    finally:
        for node in nodes:
            node.process.terminate()
            node.process.wait(15)
        redis.kill()
    summary = {
        name: {metric: _interval([r[metric] for r in results]) for metric in results[0]}
        for name, results in rounds.items()
    }
    plain, secure = (summary[node.name] for node in nodes)
    overhead = {
        metric: _interval(
            [
                s[metric] - p[metric]
                for p, s in zip(rounds[nodes[0].name], rounds[nodes[1].name], strict=True)
            ]
        )
        for metric in plain
    }
    return {
        "machine": describe_machine(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "rounds": args.rounds,
        "per_round": {
            "submits": args.submits,
            "stream_jobs": args.stream_jobs,
            "tokens_per_job": args.tokens,
            "connects": args.connects,
        },
        "modes": summary,
        "overhead_secure_minus_plain": overhead,
        "ratio_secure_over_plain": {
            metric: secure[metric]["mean"] / plain[metric]["mean"] for metric in plain
        },
    }


def _print_table(result: dict) -> None:
    names = list(result["modes"])
    print(
        f"\n{'metric':<26}" + "".join(f"{name:>28}" for name in names) + f"{'secure - plain':>28}"
    )
    for metric in result["modes"][names[0]]:
        cells = [result["modes"][name][metric] for name in names]
        cells.append(result["overhead_secure_minus_plain"][metric])
        print(
            f"{metric:<26}"
            + "".join(
                f"{c['mean']:>12.2f} [{c['ci95_low']:.2f}, {c['ci95_high']:.2f}]".rjust(28)
                for c in cells
            )
        )
    each = result["per_round"]
    print(
        f"\n{result['rounds']} rounds per mode; each round {each['submits']} Submits, "
        f"{each['stream_jobs']} streams of {each['tokens_per_job']} tokens, "
        f"{each['connects']} new connections. Load average {result['load_average_start']} "
        f"at start, {result['load_average_end']} at end; {result['machine']['cpus']} CPUs."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/security.json"))
    parser.add_argument("--rounds", type=int, default=6, help="rounds per mode (alternated)")
    parser.add_argument("--submits", type=int, default=500, help="Submit calls per round")
    parser.add_argument("--stream-jobs", type=int, default=5, help="jobs streamed per round")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per streamed job")
    parser.add_argument("--connects", type=int, default=20, help="new connections per round")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    _print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
