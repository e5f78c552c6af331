"""Sub-commands of the scheduler package: ``ssjf scheduler``.

Only light imports here (``ssjf --help`` stays instant); the server loads inside the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.common.config import (
    add_flag,
    add_option,
    add_redis_url_options,
    add_server_options,
    milliseconds,
    redis_url,
)
from services.common.tls import add_client_security_options
from services.scheduler.policies import POLICIES

# The shipped predictor artifact carries the first-stage model too (ssjf train-predictor).
DEFAULT_FIRST_STAGE = (
    Path(__file__).resolve().parent.parent
    / "predictor"
    / "artifacts"
    / "default"
    / "first_stage.npz"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scheduler's flags (each also an SSJF_* environment variable)."""
    add_server_options(parser, default_port=50051, what="scheduler")
    security = parser.add_argument_group("security (see SECURITY.md)")
    add_option(
        security,
        "--auth-file",
        default="",
        help="credentials file (TOML: client tokens -> tenants and limits, worker tokens or "
        "certificate names; token digests only, re-read when it changes); empty: auth off",
    )
    add_option(
        security,
        "--worker-port",
        type=int,
        default=-1,
        help="serve the WorkerGateway on this port only, apart from the client API "
        "(0: any free port; -1: on --port together with the client API)",
    )
    add_option(
        security,
        "--worker-host",
        default="",
        help="interface of --worker-port (empty: --host)",
    )
    add_option(
        security,
        "--worker-tls-client-ca-file",
        default="",
        help="on --worker-port, require worker certificates signed by this CA (mutual TLS "
        "for workers only; empty: --tls-client-ca-file)",
    )
    add_client_security_options(security, what="the predictor")
    add_redis_url_options(parser, what="Redis holding all scheduler state (required)")
    add_option(
        parser,
        "--predictor",
        default="",
        help="predictor address host:port; empty: no predictor, fallback scores",
    )
    add_option(
        parser,
        "--predictor-timeout-ms",
        default=200,
        type=int,
        help="longest wait for one prediction (then the job keeps its first-stage or "
        "fallback score)",
    )
    add_option(
        parser,
        "--prediction-mode",
        default="async",
        choices=["async", "sync"],
        help="async: queue each job at once with its first-stage score and re-score it when "
        "the prediction arrives (an idle worker never waits); sync: wait for the prediction "
        "before queueing",
    )
    add_option(
        parser,
        "--prediction-grace-ms",
        # prediction.DEFAULT_GRACE_S in ms, written out: importing that module (and Redis)
        # here would slow every `ssjf` command's start-up by a quarter of a second.
        default=5.0,
        type=milliseconds,
        help="async mode: ask for a job's prediction this long after queueing it, and only if "
        "it is still queued then; a job an idle worker took within it needs none (saves the "
        "predictor's work and the job's dispatch time at light load; 0: ask at once)",
    )
    add_option(
        parser,
        "--first-stage",
        default=str(DEFAULT_FIRST_STAGE),
        help="first-stage model file (hashed n-gram linear model, microseconds per prompt) "
        "scoring jobs before their prediction arrives; empty: the fallback score instead",
    )
    add_option(
        parser,
        "--max-predicted-tokens",
        default=1e6,
        type=float,
        help="predictions are clamped to [1, this] (at most 1e6: far below the priority "
        "stride, so no prediction outweighs a priority class)",
    )
    add_option(
        parser,
        "--breaker-failures",
        default=3,
        type=int,
        help="consecutive predictor failures that open the circuit breaker (no calls then)",
    )
    add_option(
        parser,
        "--breaker-open-s",
        default=5.0,
        type=float,
        help="how long the open breaker makes no predictor calls before one probe call",
    )
    add_option(
        parser,
        "--policy",
        default="ssjf",
        choices=sorted(POLICIES),
        help="queue order: fcfs, ssjf (predicted length) or sjf-oracle (true length)",
    )
    add_flag(
        parser,
        "--allow-oracle",
        help="accept oracle_output_tokens (needed by the sjf-oracle experiments)",
    )
    add_option(
        parser,
        "--aging-rate",
        default=1.0,
        type=float,
        help="ssjf/sjf-oracle aging: predicted tokens credited per second waited",
    )
    add_option(
        parser,
        "--max-wait-s",
        default=300.0,
        type=float,
        help="a job queued longer than this is served first (0: off)",
    )
    add_option(
        parser,
        "--fallback-tokens",
        default=256.0,
        type=float,
        help="predicted length assumed when the predictor cannot answer",
    )
    add_option(
        parser,
        "--lease-ttl-s",
        default=10.0,
        type=float,
        help="a lease expires after this long without a worker report",
    )
    add_option(
        parser,
        "--max-attempts",
        default=3,
        type=int,
        help="leases a job may get; a lease lost after that fails the job",
    )
    add_option(
        parser,
        "--max-queue-depth",
        default=100_000,
        type=int,
        help="queued jobs per LLM before Submit answers RESOURCE_EXHAUSTED (0: no cap)",
    )
    add_option(
        parser,
        "--job-ttl-s",
        default=3600,
        type=int,
        help="finished job records and token streams expire after this many seconds",
    )
    add_option(parser, "--default-llm", default="vicuna-13b", help="LLM of requests that name none")
    add_option(
        parser,
        "--max-prompt-chars",
        default=100_000,
        type=int,
        help="longest prompt accepted, in characters",
    )
    add_option(
        parser,
        "--completions-maxlen",
        default=100_000,
        type=int,
        help="finished (prompt, llm, generated tokens) kept in each LLM's completions stream",
    )
    add_option(
        parser,
        "--reap-interval-s",
        default=1.0,
        type=float,
        help="how often this replica looks for expired leases and missed deadlines",
    )
    add_option(
        parser,
        "--default-start-timeout-s",
        default=600.0,
        type=float,
        help="start deadline of a job whose request sets no start_timeout_ms: one no worker "
        "started by then (e.g. sent to an LLM no worker serves) fails with "
        "FINISH_REASON_DEADLINE instead of waiting forever (0: no default deadline)",
    )
    add_option(
        parser,
        "--drain-s",
        default=10.0,
        type=float,
        help="on SIGTERM, how long open calls may finish before the server stops",
    )


def _run(args: argparse.Namespace) -> int:
    from services.scheduler.server import run

    return run(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands."""
    parser = subparsers.add_parser(
        "scheduler",
        help="run the scheduler service (client API and worker gateway, state in Redis)",
        description="Run one scheduler replica. Replicas are stateless: run as many as you "
        "like on one Redis.",
    )
    add_arguments(parser)
    parser.set_defaults(run=_run)

    export = subparsers.add_parser(
        "export-completions",
        help="write finished jobs' (prompt, LLM, generated tokens) as proxy-model training data",
        description="Read the scheduler's completions streams and write prompts.jsonl + "
        "lengths.csv (the shared data format) for `ssjf train-predictor --data DIR` or "
        "`ssjf eval-predictor`. Replayed (benchmark) jobs are left out.",
    )
    add_redis_url_options(export, what="the scheduler's Redis (required)")
    export.add_argument("--out", type=Path, required=True, help="directory to write")
    export.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import asyncio

    from services.scheduler.completions import export_completions

    url = redis_url(args)
    if not url:
        print("--redis-url-file, REDIS_URL or --redis-url is required", file=sys.stderr)
        return 2
    summary = asyncio.run(export_completions(url, args.out))
    print(
        f"{summary.completions_used} of {summary.completions_read} completions -> "
        f"{summary.prompts} prompts, {summary.llms} LLMs in {args.out}"
    )
    return 0
