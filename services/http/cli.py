"""Sub-command of the HTTP front: ``ssjf http`` (OpenAI-compatible API over the scheduler).

Only light imports here (``ssjf --help`` stays instant); the server loads inside the command.
"""

from __future__ import annotations

import argparse

from services.common.config import add_option
from services.common.tls import add_client_security_options, add_server_tls_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The front's flags (each also an SSJF_* environment variable)."""
    add_option(parser, "--host", default="0.0.0.0", help="interface the HTTP front listens on")
    add_option(parser, "--port", type=int, default=8000, help="HTTP port")
    add_option(
        parser,
        "--scheduler",
        default="127.0.0.1:50051",
        help="scheduler gRPC address host:port (any replica; a DNS name of several is fine)",
    )
    add_option(
        parser,
        "--start-timeout-ms",
        type=int,
        default=0,
        help="start deadline of requests that set no start_timeout_ms: a job no worker "
        "started by then fails with 504 (0: none)",
    )
    add_option(
        parser,
        "--models-cache-s",
        type=float,
        default=1.0,
        help="how long the list of served models is reused before asking the scheduler again",
    )
    add_option(
        parser,
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request body accepted (413 above)",
    )
    add_option(
        parser,
        "--keep-alive-s",
        type=float,
        default=75.0,
        help="how long an idle keep-alive connection stays open (as nginx's default)",
    )
    add_option(
        parser,
        "--backlog",
        type=int,
        default=2048,
        help="pending TCP connections the listening socket holds",
    )
    add_server_tls_options(parser)
    add_client_security_options(parser, what="the scheduler", token=False)


def _run(args: argparse.Namespace) -> int:
    from services.http.server import run

    return run(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "http",
        help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models) in front of a scheduler",
        description="An OpenAI-compatible HTTP front: it translates each request into the "
        "scheduler's gRPC Generate, so queueing, ordering and cancellation stay in the "
        "scheduler. Stateless: run as many as needed behind a load balancer.",
    )
    add_arguments(parser)
    parser.set_defaults(run=_run)
