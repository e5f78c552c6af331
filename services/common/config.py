"""Command-line flags with environment-variable equivalents.

Every flag ``--some-name`` can also be set as ``SSJF_SOME_NAME``; the flag wins. ``--help``
shows each flag's variable and default, so a newcomer can configure a container without
reading code.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_PREFIX = "SSJF_"
# The variable Redis clients and hosting platforms set, read after SSJF_REDIS_URL.
REDIS_URL_ENV = "REDIS_URL"


def env_name(flag: str) -> str:
    """``--max-batch-size`` -> ``SSJF_MAX_BATCH_SIZE``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false)")


def milliseconds(text: str) -> float:
    """A flag's value in milliseconds: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected milliseconds >= 0, got {text!r}")
    return value


def add_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    *,
    default: Any = None,
    type: Callable[[str], Any] = str,
    help: str,
    choices: list[str] | None = None,
    env: str | None = None,
) -> None:
    """Add ``flag`` whose default comes from its environment variable when that is set.
    The variable's text stays a string default, which argparse converts with ``type`` at
    parse time: a bad value is then a usage error naming the flag (the variable is in
    ``--help``), not a traceback while the parser is built, and ``--help`` still works."""
    variable = env or env_name(flag)
    raw = os.environ.get(variable)
    parser.add_argument(
        flag,
        default=raw if raw is not None else default,
        type=type,
        choices=choices,
        help=f"{help} [env {variable}; default: {default!r}]",
    )


def add_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    *,
    help: str,
    env: str | None = None,
) -> None:
    """Add an on/off switch, off by default, also switched on by its variable."""
    variable = env or env_name(flag)
    raw = os.environ.get(variable)
    parser.add_argument(
        flag,
        action=argparse.BooleanOptionalAction,
        default=parse_bool(raw) if raw is not None else False,
        help=f"{help} [env {variable}]",
    )


def add_redis_url_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, what: str
) -> None:
    """``--redis-url`` and ``--redis-url-file``, the same on every command that opens the
    scheduler's Redis; ``redis_url(args)`` reads them."""
    # Not add_option: its help shows the default, and so would print the password of a
    # REDIS_URL set in the environment.
    parser.add_argument(
        "--redis-url",
        default="",
        help=f"{what}: redis://host:6379/0, or rediss://user:PASSWORD@host:6379/0?"
        "ssl_ca_certs=FILE for TLS and an ACL user. A flag shows in ps to every user of the "
        "machine: pass a URL holding a password through --redis-url-file or the "
        f"environment, never this flag [env {env_name('--redis-url')} or {REDIS_URL_ENV}]",
    )
    add_option(
        parser,
        "--redis-url-file",
        default="",
        help="file holding the Redis URL (a mounted secret: the way to pass a password); "
        "wins over --redis-url",
    )


def redis_url(args: argparse.Namespace) -> str:
    """The Redis URL from --redis-url-file, --redis-url, $SSJF_REDIS_URL or $REDIS_URL (the
    first set wins); "" when none is."""
    if args.redis_url_file:
        return Path(args.redis_url_file).read_text().strip()
    for value in (
        args.redis_url,
        os.environ.get(env_name("--redis-url")),
        os.environ.get(REDIS_URL_ENV),
    ):
        if value and value.strip():
            return value.strip()
    return ""


def add_server_options(parser: argparse.ArgumentParser, *, default_port: int, what: str) -> None:
    """--host, --port, --metrics-port, TLS and reflection, the same for every SSJF server."""
    add_option(parser, "--host", default="0.0.0.0", help=f"interface the {what} listens on")
    add_option(
        parser, "--port", type=int, default=default_port, help=f"{what} gRPC port (0: any free)"
    )
    add_option(
        parser,
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics on http://HOST:PORT/metrics, HOST being --host "
        "(https, and client certificates under mTLS, when TLS is on; 0: off)",
    )
    add_option(
        parser,
        "--reflection",
        default=True,
        type=parse_bool,
        help="serve gRPC reflection (lists this port's services; needs a credential when "
        "auth is on); false: off",
    )
    from services.common.tls import add_server_tls_options

    add_server_tls_options(parser)


def host_options(args: argparse.Namespace) -> dict[str, Any]:
    """ServiceHost keyword arguments from ``add_server_options``'s flags."""
    from services.common.tls import ServerTls

    return {
        "host": args.host,
        "port": args.port,
        "metrics_port": args.metrics_port or None,
        "tls": ServerTls.from_args(args),
        "reflection": args.reflection,
    }
