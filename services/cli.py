"""The ``ssjf`` command line: one sub-command per service and per user task.

Each package contributes its sub-commands through a ``register(subparsers)`` function in its
own ``cli`` module; heavy imports (torch, onnxruntime) happen inside the commands, so
``ssjf --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from services.common.config import add_option
from services.common.logs import configure_logging

# Adding a command group touches only this list and the group's own cli module.
COMMAND_MODULES = (
    "services.stack.cli",  # up, generate
    "services.predictor.cli",  # predictor, predict, train-predictor, eval-predictor
    "services.scheduler.cli",  # scheduler
    "services.worker.cli",  # worker
    "services.bench.cli",  # bench, simulate
    "services.collect.cli",  # collect
    "services.http.cli",  # http
    "services.common.cli",  # secrets
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssjf",
        description=(
            "SSJF: LLM serving that runs the shortest job first. A proxy model predicts each "
            "request's output length; the scheduler serves the shortest predicted job first."
        ),
        epilog="Every flag can also be set through the environment variable shown in its help.",
    )
    add_option(
        parser,
        "--log-level",
        default="info",
        help="log level",
        choices=["debug", "info", "warning", "error"],
    )
    add_option(
        parser, "--log-format", default="text", help="log line format", choices=["text", "json"]
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    code = args.run(args)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
