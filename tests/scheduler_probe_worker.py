"""A minimal worker speaking ssjf.v1.WorkerGateway, for the scheduler's tests.

It generates no text: token ``i`` of a job has id ``1000 + i`` and text ``"t<i> "``. It
leases jobs, streams their tokens one report at a time (``--token-delay-s`` apart), obeys
stop directives, and prints one JSON line per event on stdout (``leased``, ``stopped``,
``finished``), so a test can follow it, SIGKILL it mid-generation, and check another
worker resumes at the right index. A job produces ``sampling.replay_output_tokens`` tokens
(``--tokens`` when 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc

from services.common.grpc_server import CHANNEL_OPTIONS
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


async def run_job(
    job: scheduler_pb2.LeasedJob,
    args: argparse.Namespace,
    report: grpc.aio.StreamStreamCall,
) -> None:
    total = job.sampling.replay_output_tokens or args.tokens
    start = len(job.resume_token_ids)
    emit(
        "leased",
        job_id=job.job_id,
        lease_id=job.lease_id,
        attempt=job.attempt,
        resume=list(job.resume_token_ids),
        llm=job.llm,
    )
    for index in range(start, total):
        await asyncio.sleep(args.token_delay_s)
        token = common_pb2.Token(index=index, text=f"t{index} ", token_id=1000 + index)
        progress = scheduler_pb2.JobProgress(
            job_id=job.job_id, lease_id=job.lease_id, tokens=[token]
        )
        if index == total - 1:
            progress.outcome.CopyFrom(
                scheduler_pb2.JobOutcome(
                    finish_reason=common_pb2.FINISH_REASON_REPLAY_LENGTH, generated_tokens=total
                )
            )
        await report.write(
            scheduler_pb2.WorkerReport(worker_id=args.worker_id, progress=[progress])
        )
        directive = await report.read()
        emit("token", job_id=job.job_id, index=index)
        for stop in directive.stop:
            if stop.job_id == job.job_id:
                emit(
                    "stopped",
                    job_id=job.job_id,
                    reason=scheduler_pb2.StopJob.Reason.Name(stop.reason),
                    index=index,
                )
                return
    if total == start:  # nothing left to generate: finish at once
        progress = scheduler_pb2.JobProgress(job_id=job.job_id, lease_id=job.lease_id)
        progress.outcome.CopyFrom(
            scheduler_pb2.JobOutcome(
                finish_reason=common_pb2.FINISH_REASON_REPLAY_LENGTH, generated_tokens=total
            )
        )
        await report.write(
            scheduler_pb2.WorkerReport(worker_id=args.worker_id, progress=[progress])
        )
        await report.read()
    emit("finished", job_id=job.job_id)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scheduler", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--llm", default="vicuna-13b")
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    parser.add_argument("--wait-ms", type=int, default=2000)
    parser.add_argument("--max-jobs", type=int, default=0, help="exit after this many (0: never)")
    args = parser.parse_args()
    async with grpc.aio.insecure_channel(args.scheduler, options=CHANNEL_OPTIONS) as channel:
        gateway = scheduler_pb2_grpc.WorkerGatewayStub(channel)
        report = gateway.Report()
        emit("ready", worker_id=args.worker_id)
        done = 0
        while not args.max_jobs or done < args.max_jobs:
            reply = await gateway.Lease(
                scheduler_pb2.LeaseRequest(
                    worker_id=args.worker_id, llms=[args.llm], max_jobs=1, wait_ms=args.wait_ms
                )
            )
            for job in reply.jobs:
                await run_job(job, args, report)
                done += 1
        await report.done_writing()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
