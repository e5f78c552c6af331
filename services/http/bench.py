"""HTTP front benchmark (``make bench-http``): what the OpenAI front costs on top of gRPC.

1. **Front capacity**: one ``ssjf http`` process in front of an *instant* stand-in scheduler
   (a real gRPC server in its own process that accepts, streams ``--tokens`` tokens and ends
   each job at once), loaded by closed-loop streaming clients in separate processes. Reports
   requests/s and, because the machine may be shared, requests per CPU-second of the front
   process (what one front process sustains on a core of its own).
2. **Added latency**: sequential streamed requests, HTTP through the front vs gRPC Generate
   straight to the scheduler, interleaved, on the stand-in (the front's own cost, no model
   noise) and on the real stack (tiny model). p50 of each and p50 of the paired difference,
   with 95% bootstrap intervals.
3. **End-to-end rate** on the real stack (scheduler, predictor, one tiny-model worker):
   closed-loop streamed requests through the front and through gRPC.

Prints a table and writes JSON:

    .venv/bin/python -m services.http.bench --out bench/results/http.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.health import wait_for_http, wait_for_serving
from services.common.machine import describe_machine
from services.common.net import free_port
from services.common.paths import CHECKOUT_ROOT
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc

MODEL = "bench-llm"

# --- the instant stand-in scheduler ------------------------------------------------------


class InstantScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Answers Generate at once: accepted, ``tokens`` tokens, a DONE summary; ListModels
    names one model. With ``token`` set, Generate and ListModels require the metadata
    ``authorization: Bearer <token>`` (UNAUTHENTICATED without one, PERMISSION_DENIED with
    another), like an authenticating scheduler."""

    def __init__(self, tokens: int, model: str = MODEL, token: str = "") -> None:
        self.tokens = tokens
        self.model = model
        self.token = token
        self._count = 0

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.token:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("authorization", "")
        if not given:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        if given != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this token may not do that")

    async def Generate(self, request, context):  # type: ignore[override]
        await self._authorize(context)
        self._count += 1
        job_id = f"instant-{self._count}"
        yield scheduler_pb2.JobEvent(job_id=job_id, accepted=scheduler_pb2.JobAccepted())
        for index in range(self.tokens):
            yield scheduler_pb2.JobEvent(
                job_id=job_id,
                token=common_pb2.Token(index=index, text=f" w{index}", token_id=index),
            )
        yield scheduler_pb2.JobEvent(
            job_id=job_id,
            summary=scheduler_pb2.JobSummary(
                state=common_pb2.JOB_STATE_DONE,
                finish_reason=common_pb2.FINISH_REASON_EOS,
                generated_tokens=self.tokens,
                prompt_tokens=7,
            ),
        )

    async def ListModels(self, request, context):  # type: ignore[override]
        await self._authorize(context)
        return scheduler_pb2.ListModelsResponse(
            models=[scheduler_pb2.ServedModel(llm=self.model, workers=1)]
        )


async def serve_instant(port: int, servicer: InstantScheduler) -> grpc.aio.Server:
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


# --- a lean HTTP/1.1 load client (keep-alive, chunked SSE) ----------------------------------


def chat_payload(model: str, max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def http_request_bytes(host: str, path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    ).encode() + data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, float]:
    """Read one response (chunked or sized); returns (status, seconds to the first body
    byte after the call, as measured by the caller: here the time of the first chunk)."""
    status_line = await reader.readuntil(b"\r\n")
    status = int(status_line.split()[1])
    chunked, length = False, 0
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            break
        name, _, value = line.decode().partition(":")
        name = name.strip().lower()
        if name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "content-length":
            length = int(value)
    first_byte = 0.0
    if not chunked:
        await reader.readexactly(length)
        return status, time.perf_counter()
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if not first_byte:
            first_byte = time.perf_counter()
        await reader.readexactly(size + 2)
        if size == 0:
            return status, first_byte


async def closed_loop(
    host: str, port: int, payload: bytes, concurrency: int, duration_s: float
) -> dict[str, Any]:
    """``concurrency`` keep-alive connections, each sending its next request when the last
    answer ended, for ``duration_s``."""
    done = errors = 0
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration_s

    async def client() -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                writer.write(payload)
                status, _ = await read_response(reader)
                latencies.append(time.perf_counter() - start)
                if status == 200:
                    done += 1
                else:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"requests": done, "errors": errors, "elapsed_s": elapsed, "latencies": latencies}


def _loadgen_main(args: argparse.Namespace) -> None:
    """A load-generating process: prints its closed_loop result as one JSON line."""
    import uvloop

    payload = http_request_bytes(
        f"127.0.0.1:{args.port}", "/v1/chat/completions", chat_payload(MODEL, args.tokens)
    )
    result = uvloop.run(
        closed_loop("127.0.0.1", args.port, payload, args.concurrency, args.duration_s)
    )
    result["p50_ms"] = statistics.median(result.pop("latencies") or [0.0]) * 1e3
    print(json.dumps(result), flush=True)


def _grpc_load_main(args: argparse.Namespace) -> None:
    """The gRPC floor: the same closed loop straight to the stand-in with grpc.aio, as the
    front's own client does, no HTTP. Prints calls and this process's CPU seconds."""
    import uvloop

    async def run() -> dict[str, float]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{args.port}", options=CHANNEL_OPTIONS)
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        request = scheduler_pb2.GenerateRequest(
            llm=MODEL, messages=[common_pb2.ChatMessage(role="user", content="Hi")]
        )
        calls = 0
        stop_at = time.perf_counter() + args.duration_s

        async def client() -> None:
            nonlocal calls
            while time.perf_counter() < stop_at:
                call = stub.Generate(request)
                while await call.read() is not grpc.aio.EOF:
                    pass
                calls += 1

        cpu_before = time.process_time()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        cpu = time.process_time() - cpu_before
        await channel.close()
        return {"calls": calls, "cpu_s": cpu}

    print(json.dumps(uvloop.run(run())), flush=True)


def _standin_main(args: argparse.Namespace) -> None:
    async def main() -> None:
        server = await serve_instant(
            args.port, InstantScheduler(args.tokens, token=args.require_token)
        )
        await server.wait_for_termination()

    asyncio.run(main())


# --- statistics ------------------------------------------------------------------------


def median_ci(samples: list[float], rounds: int = 2000) -> tuple[float, float, float]:
    """Median and its 95% bootstrap interval."""
    rng = random.Random(13)
    medians = sorted(statistics.median(rng.choices(samples, k=len(samples))) for _ in range(rounds))
    return statistics.median(samples), medians[int(0.025 * rounds)], medians[int(0.975 * rounds)]


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% t interval over repeats."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the measurements ------------------------------------------------------------------


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=CHECKOUT_ROOT,
        env={**os.environ, "PYTHONPATH": str(CHECKOUT_ROOT)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def start_front(scheduler: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = _spawn(
        ["-m", "services.cli", "--log-level", "warning", "http", "--port", str(port),
         "--host", "127.0.0.1", "--scheduler", scheduler],
        log,
    )  # fmt: skip
    wait_for_http(
        f"http://127.0.0.1:{port}/health", timeout=60, alive=lambda: process.poll() is None
    )
    return process, port


def front_capacity(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    standin_port = free_port()
    standin = _spawn(
        ["-m", "services.http.bench", "--role", "standin", "--port", str(standin_port),
         "--tokens", str(args.tokens)],
        log_dir / "standin.log",
    )  # fmt: skip
    try:
        wait_for_serving(f"127.0.0.1:{standin_port}", 30, alive=lambda: standin.poll() is None)
    except Exception:
        standin.kill()
        raise
    front, port = start_front(f"127.0.0.1:{standin_port}", log_dir / "front-standin.log")
    rounds = []
    try:
        for round_index in range(args.rounds):
            cpu_before = cpu_seconds(front.pid)
            loadgen = [
                sys.executable, "-m", "services.http.bench", "--role", "loadgen",
                "--port", str(port), "--tokens", str(args.tokens),
                "--concurrency", str(args.concurrency), "--duration-s", str(args.duration_s),
            ]  # fmt: skip
            loadgens = [
                subprocess.Popen(loadgen, cwd=CHECKOUT_ROOT, stdout=subprocess.PIPE, text=True)
                for _ in range(args.loadgen_processes)
            ]
            results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in loadgens]
            front_cpu = cpu_seconds(front.pid) - cpu_before
            requests = sum(r["requests"] for r in results)
            elapsed = max(r["elapsed_s"] for r in results)
            rounds.append(
                {
                    "requests": requests,
                    "errors": sum(r["errors"] for r in results),
                    "elapsed_s": elapsed,
                    "requests_per_s": requests / elapsed,
                    "front_cpu_s": front_cpu,
                    "requests_per_front_cpu_s": requests / front_cpu if front_cpu else 0.0,
                    "client_p50_ms": statistics.median(r["p50_ms"] for r in results),
                    "load_average": os.getloadavg(),
                }
            )
            print(
                f"  capacity round {round_index + 1}: {rounds[-1]['requests_per_s']:.0f} req/s, "
                f"{rounds[-1]['requests_per_front_cpu_s']:.0f} req per front CPU-s",
                flush=True,
            )
        floor = []
        for _ in range(args.rounds):
            command = [
                sys.executable, "-m", "services.http.bench", "--role", "grpcload",
                "--port", str(standin_port), "--concurrency", str(args.concurrency),
                "--duration-s", str(min(args.duration_s, 5.0)),
            ]  # fmt: skip
            result = json.loads(
                subprocess.check_output(command, cwd=CHECKOUT_ROOT).splitlines()[-1]
            )
            floor.append(result["calls"] / result["cpu_s"])
        latency = added_latency(port, f"127.0.0.1:{standin_port}", args.pairs, MODEL, args.tokens)
    finally:
        front.terminate()
        front.wait(30)
        standin.terminate()
        standin.wait(30)
    return {
        "tokens_per_request": args.tokens,
        "concurrency": args.concurrency * args.loadgen_processes,
        "rounds": rounds,
        "requests_per_s": mean_ci([r["requests_per_s"] for r in rounds]),
        "requests_per_front_cpu_s": mean_ci([r["requests_per_front_cpu_s"] for r in rounds]),
        # The same streamed calls by a bare grpc.aio client: the front's ceiling in Python.
        "grpc_client_calls_per_cpu_s": mean_ci(floor),
        "added_latency_standin": latency,
    }


def added_latency(
    http_port: int, scheduler: str, pairs: int, model: str, max_tokens: int
) -> dict[str, Any]:
    """Interleaved sequential requests: streamed HTTP through the front vs gRPC Generate."""

    async def run() -> tuple[list[float], list[float]]:
        payload = http_request_bytes(
            f"127.0.0.1:{http_port}", "/v1/chat/completions", chat_payload(model, max_tokens)
        )
        connection = [await asyncio.open_connection("127.0.0.1", http_port)]

        async def http_once() -> None:
            reader, writer = connection[0]
            if reader.at_eof():  # the server closed the idle keep-alive connection
                connection[0] = await asyncio.open_connection("127.0.0.1", http_port)
                reader, writer = connection[0]
            writer.write(payload)
            status, _ = await read_response(reader)
            assert status == 200, status

        channel = grpc.aio.insecure_channel(scheduler, options=CHANNEL_OPTIONS)
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        request = scheduler_pb2.GenerateRequest(
            llm=model,
            messages=[common_pb2.ChatMessage(role="user", content="Name three colours.")],
            sampling=common_pb2.SamplingParams(max_new_tokens=max_tokens, temperature=0),
        )
        http_s, grpc_s = [], []
        for index in range(pairs + 5):  # the first 5 pairs warm up
            order = (0, 1) if index % 2 else (1, 0)
            for which in order:
                start = time.perf_counter()
                if which == 0:
                    await http_once()
                else:
                    async for _ in stub.Generate(request):
                        pass
                elapsed = time.perf_counter() - start
                if index >= 5:
                    (http_s if which == 0 else grpc_s).append(elapsed)
        connection[0][1].close()
        await channel.close()
        return http_s, grpc_s

    http_s, grpc_s = asyncio.run(run())
    differences = [(h - g) * 1e3 for h, g in zip(http_s, grpc_s, strict=True)]
    return {
        "pairs": pairs,
        "http_p50_ms": median_ci([s * 1e3 for s in http_s]),
        "grpc_p50_ms": median_ci([s * 1e3 for s in grpc_s]),
        "added_p50_ms": median_ci(differences),
        "load_average": os.getloadavg(),
    }


def _redis_server(log: Path) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    """A redis-server of the benchmark's own on a free port when one is installed (None: the
    launcher's embedded one)."""
    import shutil

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        return None, None
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 30
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {log}") from None
            time.sleep(0.1)


def real_stack(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:

    redis_process, redis_url = _redis_server(log_dir / "redis.log")
    try:
        return _measure_real_stack(args, log_dir, redis_url)
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(30)


def _measure_real_stack(
    args: argparse.Namespace, log_dir: Path, redis_url: str | None
) -> dict[str, Any]:
    from services.stack.launcher import LocalStack, StackConfig

    config = StackConfig(
        redis_url=redis_url,
        port=0,
        workers=1,
        served_model_name="tiny",
        model="tiny-llama",
        batching="continuous",
        max_batch_size=8,
        log_dir=log_dir / "stack",
        log_level="warning",
    )
    with LocalStack(config) as stack:
        front, port = start_front(stack.address, log_dir / "front-stack.log")
        try:
            latency = added_latency(port, stack.address, args.stack_pairs, "tiny", 8)
            print(f"  real stack added p50: {latency['added_p50_ms'][0]:.2f} ms", flush=True)
            rates = {"http": [], "grpc": []}
            for _ in range(args.rounds):
                rates["http"].append(_http_rate(port, args.stack_concurrency, args.duration_s))
                rates["grpc"].append(
                    _grpc_rate(stack.address, args.stack_concurrency, args.duration_s)
                )
        finally:
            front.terminate()
            front.wait(30)
    return {
        "added_latency": latency,
        "concurrency": args.stack_concurrency,
        "tokens_per_request": 8,
        "http_requests_per_s": mean_ci(rates["http"]),
        "grpc_requests_per_s": mean_ci(rates["grpc"]),
        "rounds": args.rounds,
        "load_average": os.getloadavg(),
    }


def _http_rate(port: int, concurrency: int, duration_s: float) -> float:
    payload = http_request_bytes(
        f"127.0.0.1:{port}", "/v1/chat/completions", chat_payload("tiny", 8)
    )
    result = asyncio.run(closed_loop("127.0.0.1", port, payload, concurrency, duration_s))
    return result["requests"] / result["elapsed_s"]


def _grpc_rate(address: str, concurrency: int, duration_s: float) -> float:
    async def run() -> float:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        request = scheduler_pb2.GenerateRequest(
            llm="tiny",
            messages=[common_pb2.ChatMessage(role="user", content="Name three colours.")],
            sampling=common_pb2.SamplingParams(max_new_tokens=8, temperature=0),
        )
        done = 0
        stop_at = time.perf_counter() + duration_s

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                async for _ in stub.Generate(request):
                    pass
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        await channel.close()
        return done / elapsed

    return asyncio.run(run())


def _fmt(interval: tuple[float, float, float], digits: int = 2) -> str:
    value, low, high = interval
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def print_table(report: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    capacity = report.get("front_capacity")
    if capacity:
        rows += [
            ("front req/s (instant stand-in)", _fmt(capacity["requests_per_s"], 0)),
            ("front req per front CPU-s", _fmt(capacity["requests_per_front_cpu_s"], 0)),
            ("bare grpc.aio calls per CPU-s", _fmt(capacity["grpc_client_calls_per_cpu_s"], 0)),
            ("added p50 ms, stand-in", _fmt(capacity["added_latency_standin"]["added_p50_ms"])),
        ]
    stack = report.get("real_stack")
    if stack:
        rows += [
            ("added p50 ms, real stack", _fmt(stack["added_latency"]["added_p50_ms"])),
            ("http p50 ms, real stack", _fmt(stack["added_latency"]["http_p50_ms"])),
            ("grpc p50 ms, real stack", _fmt(stack["added_latency"]["grpc_p50_ms"])),
            ("e2e req/s via http", _fmt(stack["http_requests_per_s"], 1)),
            ("e2e req/s via grpc", _fmt(stack["grpc_requests_per_s"], 1)),
        ]
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value [95% interval]")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"load average at the end: {report['load_average']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/http.json"))
    parser.add_argument(
        "--role", choices=["bench", "standin", "loadgen", "grpcload"], default="bench"
    )
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per stand-in answer")
    parser.add_argument("--concurrency", type=int, default=32, help="connections per loadgen")
    parser.add_argument("--loadgen-processes", type=int, default=2)
    parser.add_argument("--duration-s", type=float, default=10.0, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=300, help="latency pairs, stand-in")
    parser.add_argument("--stack-pairs", type=int, default=100, help="latency pairs, real stack")
    parser.add_argument("--stack-concurrency", type=int, default=8)
    parser.add_argument("--skip-stack", action="store_true", help="only the stand-in parts")
    parser.add_argument("--skip-capacity", action="store_true", help="only the real stack")
    parser.add_argument("--require-token", default="", help=argparse.SUPPRESS)  # tests
    args = parser.parse_args(argv)
    if args.role == "standin":
        _standin_main(args)
        return 0
    if args.role == "loadgen":
        _loadgen_main(args)
        return 0
    if args.role == "grpcload":
        _grpc_load_main(args)
        return 0
    import tempfile

    log_dir = Path(tempfile.mkdtemp(prefix="ssjf-bench-http-"))
    print(f"service logs in {log_dir}", flush=True)
    report: dict[str, Any] = {
        "machine": describe_machine(),
        "load_average_start": os.getloadavg(),
    }
    if not args.skip_capacity:
        print("front capacity and added latency on an instant stand-in scheduler ...")
        report["front_capacity"] = front_capacity(args, log_dir)
    if not args.skip_stack:
        print("real stack (tiny model) ...", flush=True)
        report["real_stack"] = real_stack(args, log_dir)
    report["load_average"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
