"""Concurrent open streams per scheduler replica (``make bench-streams``; issue 11 item 3).

Starts its own redis-server and one real ``ssjf scheduler`` process, submits N jobs, then
opens one Stream per job from asyncio gRPC clients (spread over several HTTP/2 connections,
as many clients would be) and keeps them all open. While they are open it measures:

* whether the replica still answers: QueueStats and Submit latency (p50/p99);
* what the open streams cost: the replica's RSS and Redis's connected clients;
* fan-out: the time from cancelling every job to every stream having its summary.

Each level is a round; ``--rounds`` repeats it and the table shows every round. Prints a
table and writes JSON.

    .venv/bin/python -m services.scheduler.stream_bench --streams 1000,5000 \\
        --out bench/results/streams.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import grpc
import redis

from services.common.grpc_server import CHANNEL_OPTIONS
from services.pb import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.bench import LLM, Stack

STREAMS_PER_CONNECTION = 100  # what one HTTP/2 connection carries by default


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(sample * 1e3 for sample in samples_s)
    return {
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
        "n": len(ms),
    }


async def one_round(stack: Stack, streams: int) -> dict[str, object]:
    channels = [
        grpc.aio.insecure_channel(
            stack.address,
            # A channel of its own per connection (no shared subchannel).
            options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1), ("bench.id", i)],
        )
        for i in range(max(1, -(-streams // STREAMS_PER_CONNECTION)))
    ]
    stubs = [scheduler_pb2_grpc.SchedulerStub(channel) for channel in channels]
    admin = redis.Redis.from_url(stack.redis_url)
    request = scheduler_pb2.GenerateRequest(llm=LLM, prompt="stream bench")
    rss_before = _rss_mb(stack.scheduler.pid)
    job_ids = [
        reply.job_id
        for reply in await asyncio.gather(
            *(stubs[i % len(stubs)].Submit(request, timeout=120) for i in range(streams))
        )
    ]
    summaries = 0
    all_ended = asyncio.Event()

    async def follow(index: int, job_id: str) -> None:
        nonlocal summaries
        call = stubs[index % len(stubs)].Stream(
            scheduler_pb2.StreamRequest(job_id=job_id), timeout=600
        )
        async for event in call:
            if event.HasField("summary"):
                summaries += 1
                if summaries == streams:
                    all_ended.set()

    opened_at = time.perf_counter()
    following = [asyncio.create_task(follow(i, job_id)) for i, job_id in enumerate(job_ids)]
    await asyncio.sleep(3.0)  # every stream is open and blocked
    failed_early = sum(task.done() for task in following)
    stats_s, submit_s = [], []
    for _ in range(50):
        started = time.perf_counter()
        await stubs[0].QueueStats(scheduler_pb2.QueueStatsRequest(llm=LLM), timeout=30)
        stats_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        job_ids.append((await stubs[1 % len(stubs)].Submit(request, timeout=30)).job_id)
        submit_s.append(time.perf_counter() - started)
    rss_open = _rss_mb(stack.scheduler.pid)
    redis_clients = int(admin.info("clients")["connected_clients"])
    cancelled_at = time.perf_counter()
    replies = await asyncio.gather(
        *(
            stubs[i % len(stubs)].Cancel(scheduler_pb2.CancelRequest(job_id=job_id), timeout=600)
            for i, job_id in enumerate(job_ids)
        ),
        return_exceptions=True,
    )
    cancel_errors = [str(reply) for reply in replies if isinstance(reply, Exception)]
    if cancel_errors:
        print(f"{len(cancel_errors)} Cancel calls failed, e.g. {cancel_errors[0]}", flush=True)
    try:
        await asyncio.wait_for(all_ended.wait(), timeout=300)
    except TimeoutError:
        print(f"only {summaries} of {streams} streams got their summary", flush=True)
        for task in following:
            task.cancel()
    fan_out_s = time.perf_counter() - cancelled_at
    await asyncio.gather(*following, return_exceptions=True)
    for channel in channels:
        await channel.close()
    admin.flushall()
    return {
        "streams": streams,
        "connections": len(channels),
        "open_and_served": summaries,
        "ended_early": failed_early,
        "cancel_errors": len(cancel_errors),
        "queue_stats_while_open": _percentiles(stats_s),
        "submit_while_open": _percentiles(submit_s),
        "scheduler_rss_mb_before": round(rss_before, 1),
        "scheduler_rss_mb_open": round(rss_open, 1),
        "redis_connected_clients_open": redis_clients,
        "cancel_to_all_summaries_s": round(fan_out_s, 3),
        "seconds_to_open_and_measure": round(cancelled_at - opened_at, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1000,5000", help="comma-separated levels")
    parser.add_argument("--rounds", type=int, default=1, help="repeats of each level")
    parser.add_argument("--out", type=Path, default=Path("bench/results/streams.json"))
    args = parser.parse_args()
    stack = Stack()
    stack.start()
    rows = []
    try:
        for streams in [int(level) for level in args.streams.split(",")]:
            for round_index in range(args.rounds):
                print(f"round {round_index + 1}/{args.rounds}: {streams} streams ...", flush=True)
                row = asyncio.run(one_round(stack, streams))
                row["round"] = round_index + 1
                rows.append(row)
    finally:
        stack.stop()
    header = (
        f"{'streams':>8}{'round':>6}{'served':>8}{'early':>6}{'stats p50/p99 ms':>18}"
        f"{'submit p50/p99 ms':>19}{'RSS MB':>14}{'redis clients':>14}{'fan-out s':>10}"
    )
    print(header)
    for row in rows:
        stats, submit = row["queue_stats_while_open"], row["submit_while_open"]
        print(
            f"{row['streams']:>8}{row['round']:>6}{row['open_and_served']:>8}"
            f"{row['ended_early']:>6}"
            f"{stats['p50_ms']:>9.1f}/{stats['p99_ms']:<8.1f}"
            f"{submit['p50_ms']:>9.1f}/{submit['p99_ms']:<9.1f}"
            f"{row['scheduler_rss_mb_before']:>6.0f}->{row['scheduler_rss_mb_open']:<6.0f}"
            f"{row['redis_connected_clients_open']:>14}{row['cancel_to_all_summaries_s']:>10.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
