"""Runs one HTTP front process: uvicorn (uvloop, httptools) serving the Starlette app."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from services.http.app import Front, FrontConfig
from services.http.backend import SchedulerBackend

log = logging.getLogger(__name__)


def build_front(args: argparse.Namespace) -> Front:
    return Front(
        SchedulerBackend(args.scheduler, catalog_ttl_s=args.models_cache_s),
        FrontConfig(start_timeout_ms=args.start_timeout_ms, max_body_bytes=args.max_body_bytes),
    )


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
    )
    log.info("http front starting", extra={"port": args.port, "scheduler": args.scheduler})
    uvicorn.Server(config).run()
    return 0
