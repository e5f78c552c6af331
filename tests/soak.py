"""Bounded soak (``make soak``, about 10 minutes): nothing lost, nothing stuck, nothing leaks.

Runs real processes on loopback (its own redis-server, two scheduler replicas, two
tiny-model workers). Concurrent clients loop for ``--duration-s`` over a random mix:
Generate to the end, Generate abandoned at a random moment (disconnect), Submit then Cancel,
Submit then Stream. Then it checks the invariant of the fault suite on every job, reports
each service's RSS at the start and at the end, and waits out the job TTL to check that
Redis's key count falls back to its baseline (only the per-LLM counters, the LLM set and the
capped completions stream stay). Prints progress, a table, and writes JSON.

    .venv/bin/python -m tests.soak --duration-s 600 --out bench/results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from pathlib import Path

import grpc
import redis

from services.pb import scheduler_pb2
from tests.faults_support import (
    Client,
    FaultStack,
    JobResult,
    check_job,
    check_no_live_work,
    replay_request,
    wait_final,
)

JOB_TTL_S = 60  # jobs are checked within seconds of their end, well before they expire
# Keys that outlive every job: counters, the LLM set, the capped completions stream, the
# wake-up list (bounded).
PERSISTENT = ("ssjf:llms", "ssjf:metrics:", "ssjf:completions", "ssjf:notify:")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def job_keys(admin: redis.Redis) -> int:
    return sum(1 for key in admin.scan_iter("ssjf:*", count=1000) if not key.startswith(PERSISTENT))


async def client_loop(
    client: Client, stop_at: float, rng: random.Random, results: list, ended: list
) -> None:
    while time.monotonic() < stop_at:
        result = await one_action(client, rng)
        results.append(result)
        ended.append((time.monotonic(), result))


async def one_action(client: Client, rng: random.Random) -> JobResult:
    action = rng.random()
    tokens = rng.randint(5, 120)
    if action < 0.45:  # a patient client
        return await client.run(replay_request(tokens), timeout_s=300)
    if action < 0.75:  # a client that hangs up at a random moment
        result = JobResult()
        call = client.stub().Generate(replay_request(tokens), timeout=300)

        async def read() -> None:
            async for event in call:
                Client._take(event, result, None)

        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
            await asyncio.wait_for(read(), rng.uniform(0.0, 3.0))
        return result
    stub = client.stub()
    reply = await stub.Submit(replay_request(tokens), timeout=60)
    result = JobResult(job_id=reply.job_id)
    if action < 0.9:  # Submit, then Cancel at a random moment
        await asyncio.sleep(rng.uniform(0.0, 2.0))
        await stub.Cancel(scheduler_pb2.CancelRequest(job_id=reply.job_id), timeout=60)
        return result
    # Submit, then follow with Stream
    async for event in client.stub().Stream(scheduler_pb2.StreamRequest(job_id=reply.job_id)):
        Client._take(event, result, None)
    return result


async def soak(stack: FaultStack, addresses: list[str], args: argparse.Namespace) -> list:
    client = Client(addresses)
    results: list[JobResult] = []
    stop_at = time.monotonic() + args.duration_s
    ended: list[tuple[float, JobResult]] = []
    states: dict[str, int] = {}
    loops = [
        asyncio.create_task(client_loop(client, stop_at, random.Random(seed), results, ended))
        for seed in range(args.clients)
    ]
    checker = asyncio.create_task(check_as_they_end(stack, ended, states))
    started = time.monotonic()
    while not all(task.done() for task in loops):
        await asyncio.sleep(min(30.0, max(1.0, stop_at - time.monotonic())))
        done = sum(r.summary is not None for r in results)
        print(
            f"[{time.monotonic() - started:6.0f}s] jobs {len(results)}, followed to the end {done}",
            flush=True,
        )
    for task in loops:
        task.result()  # a client error fails the soak
    await client.close()
    ended.append((float("inf"), None))  # the checker finishes what is left, then stops
    await checker
    return results, states


async def check_as_they_end(stack: FaultStack, ended: list, states: dict) -> None:
    """The invariant for each job, a few seconds after its client is done with it (its
    record expires JOB_TTL_S after its end, so it is checked while it exists)."""
    admin = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    while True:
        await asyncio.sleep(2)
        now = time.monotonic()
        due = [item for item in ended if item[0] <= now - 3 or item[1] is None]
        for item in due:
            ended.remove(item)
            result = item[1]
            if result is None:
                if not ended:
                    return
                ended.append(item)
                continue
            if not result.job_id:  # hung up before the acceptance: counted by Redis only
                states["NOT_SEEN"] = states.get("NOT_SEEN", 0) + 1
                continue
            records = await asyncio.to_thread(wait_final, admin, [result.job_id], 30)
            state = check_job(admin, result, records[result.job_id])
            states[state] = states.get(state, 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args()
    stack = FaultStack()
    try:
        flags = ("--job-ttl-s", str(JOB_TTL_S))
        addresses = [stack.start_scheduler(*flags), stack.start_scheduler(*flags)]
        stack.start_worker(addresses)
        stack.start_worker(addresses)
        admin = redis.Redis.from_url(stack.redis.url, decode_responses=True)
        services = {
            **{f"scheduler-{i}": s.process.pid for i, (s, _) in enumerate(stack.schedulers)},
            **{f"worker-{i}": s.process.pid for i, s in enumerate(stack.workers)},
            "redis": stack.redis.process.pid,
        }
        rss_start = {name: rss_mb(pid) for name, pid in services.items()}
        keys_baseline = job_keys(admin)
        print(f"soak: {args.clients} clients for {args.duration_s:.0f} s", flush=True)
        results, states = asyncio.run(soak(stack, addresses, args))
        rss_end = {name: rss_mb(pid) for name, pid in services.items()}
        keys_end = job_keys(admin)
        check_no_live_work(admin)
        assert sum(states.values()) == len(results), (states, len(results))
        print(f"invariant holds for {len(results)} jobs: {states}", flush=True)
        print(f"waiting {JOB_TTL_S + 5} s for finished jobs to expire ...", flush=True)
        time.sleep(JOB_TTL_S + 5)
        keys_after_ttl = job_keys(admin)
        report = {
            "duration_s": args.duration_s,
            "clients": args.clients,
            "jobs": len(results),
            "states": states,
            "rss_mb_start": rss_start,
            "rss_mb_end": rss_end,
            "job_keys_baseline": keys_baseline,
            "job_keys_at_end": keys_end,
            "job_keys_after_ttl": keys_after_ttl,
            "total_redis_keys_after_ttl": admin.dbsize(),
        }
    finally:
        stack.close()
    print(f"{'service':<14}{'RSS start MB':>14}{'RSS end MB':>12}")
    for name in rss_start:
        print(f"{name:<14}{rss_start[name]:>14.1f}{rss_end[name]:>12.1f}")
    print(f"job keys: baseline {keys_baseline}, at end {keys_end}, after TTL {keys_after_ttl}")
    assert keys_after_ttl == keys_baseline, "job keys outlived their TTL"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
