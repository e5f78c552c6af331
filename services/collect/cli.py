"""``ssjf collect``: label a prompt set with the served LLM's answers (see core.py)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from services.common.config import add_flag, add_option
from services.common.tls import ChannelSecurity, add_client_security_options


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Sampling flags shared by ``generate`` and ``collect`` (read by ``sampling_args``)."""
    add_option(parser, "--temperature", type=float, default=0.0, help="0 = greedy")
    add_option(parser, "--top-p", type=float, default=1.0, help="nucleus sampling mass")
    add_option(parser, "--seed", type=int, help="sampling seed")
    add_option(
        parser,
        "--repetition-penalty",
        type=float,
        default=0.0,
        help="repetition penalty (HF arithmetic) over the answer's tokens (1 = off; 0 = the "
        "server's default, 1.2 for smollm2-135m-instruct)",
    )
    add_option(
        parser,
        "--presence-penalty",
        type=float,
        default=0.0,
        help="OpenAI-style presence penalty in [-2, 2] over the answer's tokens",
    )
    add_option(
        parser,
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="OpenAI-style frequency penalty in [-2, 2] over the answer's tokens",
    )


def sampling_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``GenerateOptions`` fields of the flags ``add_sampling_options`` added."""
    names = ("temperature", "top_p", "seed", "repetition_penalty", "presence_penalty")
    return {name: getattr(args, name) for name in (*names, "frequency_penalty")}


def register(subparsers: argparse._SubParsersAction) -> None:
    collect = subparsers.add_parser(
        "collect",
        help="label a prompt set with the served LLM's own answers (resumable)",
        description=(
            "Send every prompt of a prompts.jsonl through a running stack, at most "
            "--concurrency at a time, and write the shared data format into --out: "
            "prompts.jsonl, lengths.csv (model,prompt_id,output_tokens,output_chars) and "
            "outputs.jsonl (texts, finish reasons, settings). Restarting with the same --out "
            "skips the prompts already answered and appends the rest. With --report, print "
            "the length distribution of one or more --out directories instead (and Kendall's "
            "tau between the first two, for two sampled runs of the same prompts)."
        ),
    )
    add_option(collect, "--server", default="127.0.0.1:50051", help="scheduler HOST:PORT")
    add_option(collect, "--prompts", help="prompts.jsonl to label (prompt_id, prompt, source)")
    add_option(collect, "--out", help="output directory (created; resumed when it exists)")
    add_option(collect, "--llm", default="", help="LLM name (empty: the scheduler's default)")
    add_option(
        collect,
        "--label",
        default="",
        help="model column of lengths.csv (default: --llm, else 'default')",
    )
    add_option(
        collect,
        "--concurrency",
        type=int,
        default=16,
        help="prompts in flight at once (at least the workers' total batch size, so "
        "batches stay full)",
    )
    add_option(
        collect,
        "--max-new-tokens",
        type=int,
        default=0,
        help="answer length cap (0: the worker's default); answers cut by it are marked "
        "finish_reason=length",
    )
    add_sampling_options(collect)  # a --seed is every prompt's job's seed
    add_option(
        collect,
        "--subset",
        type=int,
        default=0,
        help="label only this many prompts, drawn by a --subset-seed shuffle (0: all)",
    )
    add_option(collect, "--subset-seed", type=int, default=0, help="seed of --subset's draw")
    add_flag(
        collect,
        "--shortest-first",
        help="send prompts shortest first, so prompts batched together have similar lengths "
        "(a batch pads every row to its longest prompt); for prompt sets with very long ones",
    )
    add_option(
        collect, "--timeout-s", type=float, default=3600.0, help="give up on one prompt after"
    )
    add_client_security_options(collect, what="the scheduler")
    collect.add_argument(
        "--report",
        nargs="+",
        metavar="DIR",
        help="print the length distribution of these collect directories and exit",
    )
    collect.set_defaults(run=_run_collect)


def _run_collect(args: argparse.Namespace) -> int:
    from services.collect.core import (
        CollectConfig,
        collect,
        length_report,
        self_consistency_tau,
    )

    if args.report:
        directories = [Path(directory) for directory in args.report]
        result = {str(d): asdict(length_report(d)) for d in directories}
        if len(directories) >= 2:
            tau, shared = self_consistency_tau(directories[0], directories[1])
            result["kendall_tau_first_two"] = {"tau": tau, "prompts": shared}
        print(json.dumps(result, indent=2))
        return 0
    if not args.prompts or not args.out:
        print("collect needs --prompts and --out (or --report DIR...)", file=sys.stderr)
        return 2
    import asyncio

    from services.stack.client import GenerateOptions

    request = GenerateOptions(
        server=args.server,
        prompt="",
        llm=args.llm,
        max_new_tokens=args.max_new_tokens,
        timeout_s=args.timeout_s,
        security=ChannelSecurity.from_args(args),
        **sampling_args(args),
    )
    config = CollectConfig(
        prompts=Path(args.prompts),
        out=Path(args.out),
        request=request,
        label=args.label,
        concurrency=args.concurrency,
        subset=args.subset,
        subset_seed=args.subset_seed,
        shortest_first=args.shortest_first,
    )
    failed = asyncio.run(collect(config))
    return 1 if failed else 0
