"""Runs one HTTP front process: uvicorn (uvloop, httptools) serving the Starlette app."""

from __future__ import annotations

import argparse
import logging
import ssl

import uvicorn

from services.common.tls import ChannelSecurity, ServerTls
from services.http.app import Front, FrontConfig
from services.http.backend import SchedulerBackend

log = logging.getLogger(__name__)


def build_front(args: argparse.Namespace) -> Front:
    return Front(
        SchedulerBackend(
            args.scheduler,
            catalog_ttl_s=args.models_cache_s,
            security=ChannelSecurity.from_args(args),
        ),
        FrontConfig(start_timeout_ms=args.start_timeout_ms, max_body_bytes=args.max_body_bytes),
    )


def _https(tls: ServerTls | None) -> dict[str, object]:
    if tls is None:
        return {}
    settings: dict[str, object] = {
        "ssl_certfile": str(tls.cert_file),
        "ssl_keyfile": str(tls.key_file),
    }
    if tls.client_ca_file is not None:
        settings |= {"ssl_ca_certs": str(tls.client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return settings


def run(args: argparse.Namespace) -> int:
    front = build_front(args)
    config = uvicorn.Config(
        front.app(),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        backlog=args.backlog,
        timeout_keep_alive=args.keep_alive_s,
        access_log=False,
        log_config=None,  # keep the ssjf log format (services/common/logs.py)
        timeout_graceful_shutdown=10,
        # HTTPS with --tls-cert-file/--tls-key-file (read at start: restart to rotate);
        # client certificates required with --tls-client-ca-file.
        **_https(ServerTls.from_args(args)),
    )
    log.info("http front starting", extra={"port": args.port, "scheduler": args.scheduler})
    uvicorn.Server(config).run()
    return 0
