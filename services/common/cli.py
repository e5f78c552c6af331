"""Sub-commands of the shared package: ``ssjf secrets`` (light imports only here)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "secrets",
        help="generate a CA, TLS certificates, tokens, the auth file and Redis credentials",
        description="Write a private CA, server and client certificates, client and worker "
        "tokens, the scheduler's --auth-file and Redis ACL credentials into --out (see "
        "SECURITY.md). Never commit them.",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument(
        "--servers",
        default="scheduler,predictor,worker,redis,http",
        help="comma-separated server names (each gets a certificate for that DNS name)",
    )
    parser.add_argument("--tenants", default="demo", help="comma-separated client tenants")
    parser.add_argument("--redis-host", default="redis", help="Redis host in redis-url")
    parser.add_argument("--days", type=int, default=365, help="certificate lifetime")
    parser.add_argument(
        "--ca-path",
        default="",
        help="path of ca.crt where the scheduler will read it (in redis-url); default: here",
    )
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing when --out already has a CA"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite existing secrets: a new CA, tokens and Redis password, not a "
        "renewal of certificates under the old CA (SECURITY.md)",
    )
    parser.add_argument(
        "--owner",
        type=int,
        default=-1,
        help="give the files to this uid (run as root in a set-up container whose services "
        "run as another user; Redis's key and ACL file in redis/ are then readable by all, "
        "for Redis's own uid); -1: leave them to the current user, everything secret 0600",
    )
    parser.set_defaults(run=_run_secrets)


def _run_secrets(args: argparse.Namespace) -> int:
    from services.common.pki import run

    return run(args)
