"""An open-loop gRPC load generator: requests go out at their arrival times, whatever the
server's state, and each one's completion time is measured on the client.

Open loop matters: a closed loop (send the next request when one finishes) never builds a
queue, and without a queue every scheduling policy is the same. Each request is one
``Scheduler.Generate`` stream; the client times submission, first token and last event, and
keeps the server's own ``JobSummary`` timings beside them.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import grpc

from services.bench.realgen import REAL_MAX_NEW_TOKENS
from services.bench.workload import Request
from services.common.channels import dial_aio
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc


@dataclass
class RequestResult:
    """What one request saw. Times are seconds from the start of the run, measured here."""

    index: int
    prompt_id: int
    output_tokens: int
    true_output_tokens: int
    arrival_s: float  # when it was due
    submitted_s: float  # when it was sent
    first_token_s: float = math.nan
    finished_s: float = math.nan
    tokens: int = 0
    state: str = ""
    finish_reason: str = ""
    error: str = ""
    predicted_output_tokens: float = math.nan
    prediction_fallback: bool = False
    # The server's JobSummary.
    server_queue_wait_s: float = math.nan
    server_ttft_s: float = math.nan
    server_completion_s: float = math.nan
    attempts: int = 0
    # Which round of its run (``ssjf bench --rounds``) the request belonged to.
    round: int = 0
    # The LLM asked for, the job's id, and (read back with GetJob after the run) the worker
    # that served it and the predictor version that scored it.
    llm: str = ""
    job_id: str = ""
    worker_id: str = ""
    predictor_version: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "JOB_STATE_DONE"

    @property
    def jct_s(self) -> float:
        return self.finished_s - self.submitted_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.submitted_s

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "jct_s": self.jct_s, "ttft_s": self.ttft_s}


def generate_request(
    request: Request, llm: str, oracle: bool, run_id: str
) -> scheduler_pb2.GenerateRequest:
    """The Generate call replaying ``request``: exactly its number of tokens, greedy."""
    return scheduler_pb2.GenerateRequest(
        client_request_id=f"{run_id}-{request.index}",
        llm=request.llm or llm,
        prompt=request.prompt,
        sampling=_sampling(request),
        # Only the oracle policy may see the true length; the scheduler refuses it otherwise.
        oracle_output_tokens=request.output_tokens if oracle else 0,
    )


def _sampling(request: Request) -> common_pb2.SamplingParams:
    if request.real:  # greedy to EOS under the serving defaults, as the labels were made
        return common_pb2.SamplingParams(max_new_tokens=REAL_MAX_NEW_TOKENS)
    return common_pb2.SamplingParams(replay_output_tokens=request.output_tokens)


async def _one_request(
    stub: scheduler_pb2_grpc.SchedulerStub,
    call: scheduler_pb2.GenerateRequest,
    result: RequestResult,
    clock: Callable[[], float],
    timeout_s: float,
) -> RequestResult:
    try:
        async for event in stub.Generate(call, timeout=timeout_s):
            result.job_id = result.job_id or event.job_id
            kind = event.WhichOneof("event")
            if kind == "token":
                if result.tokens == 0:
                    result.first_token_s = clock()
                result.tokens += 1
            elif kind == "accepted":
                result.predicted_output_tokens = event.accepted.predicted_output_tokens
                result.prediction_fallback = event.accepted.prediction_fallback
            elif kind == "summary":
                result.finished_s = clock()
                summary = event.summary
                result.state = common_pb2.JobState.Name(summary.state)
                result.finish_reason = common_pb2.FinishReason.Name(summary.finish_reason)
                result.error = summary.error
                result.server_queue_wait_s = summary.queue_wait_s
                result.server_ttft_s = summary.time_to_first_token_s
                result.server_completion_s = summary.completion_s
                result.attempts = summary.attempts
    except grpc.aio.AioRpcError as error:
        result.finished_s = clock()
        result.state = "RPC_ERROR"
        result.error = f"{error.code().name}: {error.details()}"
    return result


async def run_open_loop(
    address: str,
    requests: Sequence[Request],
    llm: str,
    oracle: bool = False,
    timeout_s: float = 600.0,
    on_done: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:
    """Send every request at its arrival time and wait for all of them to finish."""
    run_id = uuid.uuid4().hex[:12]
    async with dial_aio(address) as channel:  # TLS and token from SSJF_TLS_*/SSJF_TOKEN*
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        tasks = []
        for request in sorted(requests, key=lambda r: r.arrival_s):
            delay = request.arrival_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            result = RequestResult(
                index=request.index,
                prompt_id=request.prompt_id,
                output_tokens=request.output_tokens,
                true_output_tokens=request.true_output_tokens,
                arrival_s=request.arrival_s,
                submitted_s=clock(),
                llm=request.llm or llm,
            )
            call = generate_request(request, llm, oracle, run_id)
            task = asyncio.create_task(_one_request(stub, call, result, clock, timeout_s))
            if on_done is not None:
                task.add_done_callback(lambda done: on_done(done.result()))
            tasks.append(task)
        results = list(await asyncio.gather(*tasks))
        await read_back(stub, results)
        return results


async def queue_counters(address: str) -> Counter[str]:
    """The scheduler's job counters (QueueStats), summed over every LLM's queue. They are
    shared by all replicas and only grow, so a run's own counts are the difference of two
    readings (and include any other client's traffic on a ``--server`` the user shares)."""
    async with dial_aio(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        reply = await stub.QueueStats(scheduler_pb2.QueueStatsRequest(), timeout=30)
    total: Counter[str] = Counter()
    for queue in reply.queues:
        total.update(dict(queue.counters))
    return total


async def read_back(stub: scheduler_pb2_grpc.SchedulerStub, results: list[RequestResult]) -> None:
    """Worker, predicted tokens and predictor version of each finished job, from its record
    (after the run, so never on a job's critical path). The record holds the score the job
    ended with: the proxy model's where its answer re-scored the queued job, else the
    first-stage estimate the job was accepted (and dispatched) with, which is all the
    Accepted event can say. A record already expired keeps what the stream said."""

    async def one(result: RequestResult) -> None:
        if not result.job_id:
            return
        try:
            job = await stub.GetJob(scheduler_pb2.GetJobRequest(job_id=result.job_id), timeout=30)
        except grpc.aio.AioRpcError:
            return
        result.worker_id = job.worker_id
        result.predictor_version = job.predictor_version
        result.predicted_output_tokens = job.predicted_output_tokens

    for start in range(0, len(results), 64):
        await asyncio.gather(*(one(r) for r in results[start : start + 64]))
