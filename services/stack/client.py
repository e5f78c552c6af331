"""A terminal client for the scheduler's Generate stream."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import grpc

from services.common.channels import dial
from services.common.tls import ChannelSecurity
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc


@dataclass
class GenerateOptions:
    server: str
    prompt: str
    llm: str = ""
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    priority: int = 0
    request_id: str = ""
    timeout_s: float = 600.0
    # TLS and the client's token (default: from the SSJF_TLS_* / SSJF_TOKEN* environment).
    security: ChannelSecurity | None = None


def build_request(options: GenerateOptions) -> scheduler_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        stop=options.stop,
        repetition_penalty=options.repetition_penalty,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
    )
    if options.seed is not None:
        sampling.seed = options.seed
    return scheduler_pb2.GenerateRequest(
        client_request_id=options.request_id,
        llm=options.llm,
        prompt=options.prompt,
        sampling=sampling,
        priority=options.priority,
    )


def generate(options: GenerateOptions) -> int:
    """Stream one answer to stdout, a summary to stderr. Returns a process exit code."""
    with dial(options.server, options.security) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        call = stub.Generate(build_request(options), timeout=options.timeout_s)
        try:
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "accepted":
                    print(
                        f"[job {event.job_id}: predicted "
                        f"{event.accepted.predicted_output_tokens:.0f} tokens"
                        f"{' (predictor fallback)' if event.accepted.prediction_fallback else ''}]",
                        file=sys.stderr,
                        flush=True,
                    )
                elif kind == "token":
                    sys.stdout.write(event.token.text)
                    sys.stdout.flush()
                elif kind == "summary":
                    _print_summary(event.summary)
                    return 0 if event.summary.state == common_pb2.JOB_STATE_DONE else 1
        except KeyboardInterrupt:
            # Closing the stream tells the scheduler to cancel the job and free its worker.
            call.cancel()
            print("\n[cancelled]", file=sys.stderr)
            return 130
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print("\nerror: the stream ended without a summary", file=sys.stderr)
    return 1


def _print_summary(summary: scheduler_pb2.JobSummary) -> None:
    state = common_pb2.JobState.Name(summary.state).removeprefix("JOB_STATE_").lower()
    reason = common_pb2.FinishReason.Name(summary.finish_reason)
    reason = reason.removeprefix("FINISH_REASON_").lower()
    ttft_ms = summary.time_to_first_token_s * 1e3
    print(
        f"\n[{state} ({reason}): {summary.generated_tokens} tokens "
        f"(predicted {summary.predicted_output_tokens:.0f}), queue wait "
        f"{summary.queue_wait_s * 1e3:.0f} ms, first token {ttft_ms:.0f} ms, "
        f"total {summary.completion_s:.2f} s"
        f"{', error: ' + summary.error if summary.error else ''}]",
        file=sys.stderr,
    )
