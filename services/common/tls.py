"""TLS for every gRPC hop: server credentials that follow certificate rotation, and one
helper that every SSJF client (worker, scheduler -> predictor, ``ssjf generate``, benches,
health checks) dials with.

Server side: ``--tls-cert-file``/``--tls-key-file`` turn TLS on; ``--tls-client-ca-file``
also requires and verifies a client certificate (mutual TLS). The files are read again
whenever their modification time changes, on the next handshake, so a rotated certificate
(a renewed Kubernetes secret, a cert-manager renewal) is served without a restart;
established connections keep the certificate they were opened with.

Client side (environment variables, or the same-named flags where a command has them):

* ``SSJF_TLS_CA_FILE``: CA bundle that signs the servers' certificates; setting it turns
  TLS on. ``SSJF_TLS=true`` turns it on with the system's roots instead.
* ``SSJF_TLS_CLIENT_CERT_FILE``/``SSJF_TLS_CLIENT_KEY_FILE``: a client certificate (mTLS).
* ``SSJF_TLS_SERVER_NAME``: the name to expect in the server's certificate when it differs
  from the host dialled (e.g. dialling an IP).
* ``SSJF_TOKEN_FILE`` (a mounted secret) or ``SSJF_TOKEN``: the bearer token sent as
  ``authorization: Bearer ...`` (a client's tenant token, or a worker's token).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.config import add_option, parse_bool
from services.common.principals import read_secret

TOKEN_FILE_ENV = "SSJF_TOKEN_FILE"
TOKEN_ENV = "SSJF_TOKEN"


@dataclass(frozen=True)
class ServerTls:
    cert_file: Path
    key_file: Path
    # Set: clients must present a certificate signed by this CA (mutual TLS).
    client_ca_file: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerTls | None:
        cert, key = getattr(args, "tls_cert_file", ""), getattr(args, "tls_key_file", "")
        client_ca = getattr(args, "tls_client_ca_file", "")
        if not cert and not key:
            if client_ca:
                raise SystemExit("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
            return None
        if not (cert and key):
            raise SystemExit("--tls-cert-file and --tls-key-file go together")
        return cls(Path(cert), Path(key), Path(client_ca) if client_ca else None)

    def files(self) -> list[Path]:
        return [
            self.cert_file,
            self.key_file,
            *([self.client_ca_file] if self.client_ca_file else []),
        ]


def add_server_tls_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    add_option(parser, "--tls-cert-file", default="",
               help="PEM certificate chain of this server; with --tls-key-file turns TLS on "
               "(re-read when the file changes)")  # fmt: skip
    add_option(parser, "--tls-key-file", default="", help="PEM private key of --tls-cert-file")
    add_option(parser, "--tls-client-ca-file", default="",
               help="require client certificates signed by this CA (mutual TLS)")  # fmt: skip


@dataclass(frozen=True)
class ChannelSecurity:
    """How to dial an SSJF server: TLS (and a client certificate), and a bearer token."""

    tls: bool = False
    ca_file: str = ""
    client_cert_file: str = ""
    client_key_file: str = ""
    server_name: str = ""
    token: str = ""
    # The file ``token`` was read from: read again when it changes (token rotation).
    token_file: str = ""

    @classmethod
    def from_env(cls) -> ChannelSecurity:
        return cls(
            tls=parse_bool(os.environ.get("SSJF_TLS", ""))
            or bool(os.environ.get("SSJF_TLS_CA_FILE")),
            ca_file=os.environ.get("SSJF_TLS_CA_FILE", ""),
            client_cert_file=os.environ.get("SSJF_TLS_CLIENT_CERT_FILE", ""),
            client_key_file=os.environ.get("SSJF_TLS_CLIENT_KEY_FILE", ""),
            server_name=os.environ.get("SSJF_TLS_SERVER_NAME", ""),
            token=read_secret(TOKEN_FILE_ENV, TOKEN_ENV),
            token_file=os.environ.get(TOKEN_FILE_ENV, ""),
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ChannelSecurity:
        """From ``add_client_security_options``'s flags (which default to the variables)."""
        token_file = getattr(args, "token_file", "")
        token = Path(token_file).read_text().strip() if token_file else ""
        return cls(
            tls=args.tls or bool(args.tls_ca_file),
            ca_file=args.tls_ca_file,
            client_cert_file=args.tls_client_cert_file,
            client_key_file=args.tls_client_key_file,
            server_name=args.tls_server_name,
            token=token or os.environ.get(TOKEN_ENV, "").strip(),
            token_file=token_file,
        )

    def options(self, options: list[tuple[str, Any]] | None = None) -> list[tuple[str, Any]]:
        from services.common.grpc_server import CHANNEL_OPTIONS

        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return [*(CHANNEL_OPTIONS if options is None else options), *extra]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class TokenSource:
    """The bearer-token metadata of ``security``, following its token file: checked at most
    once per ``recheck_s``, re-read when its modification time changes."""

    def __init__(self, security: ChannelSecurity, recheck_s: float = 1.0) -> None:
        self._security = security
        self._metadata = security.metadata()
        self._path = Path(security.token_file) if security.token_file else None
        self._recheck_s = recheck_s
        self._checked_at = time.monotonic()
        self._stamp = self._mtime()

    def _mtime(self) -> int:
        try:
            return self._path.stat().st_mtime_ns if self._path else 0
        except OSError:
            return 0

    def metadata(self) -> tuple[tuple[str, str], ...]:
        now = time.monotonic()
        if self._path is None or now - self._checked_at < self._recheck_s:
            return self._metadata
        self._checked_at = now
        stamp = self._mtime()
        if stamp and stamp != self._stamp:
            token = self._path.read_text().strip()
            if token:
                self._stamp = stamp
                self._metadata = (("authorization", f"Bearer {token}"),)
        return self._metadata


def add_client_security_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    what: str = "the server",
    token: bool = True,
) -> None:
    """Flags for dialling ``what`` securely; credentials themselves only from files/env.
    ``token=False``: no --token-file (a caller that forwards its own callers' tokens)."""
    add_option(parser, "--tls", default=False, type=parse_bool,
               help=f"dial {what} over TLS with the system's CA roots")  # fmt: skip
    add_option(parser, "--tls-ca-file", default="",
               help=f"CA bundle that signed {what}'s certificate; turns TLS on")  # fmt: skip
    add_option(parser, "--tls-client-cert-file", default="",
               help="client certificate to present (mutual TLS)")  # fmt: skip
    add_option(parser, "--tls-client-key-file", default="", help="key of --tls-client-cert-file")
    add_option(parser, "--tls-server-name", default="",
               help=f"name expected in {what}'s certificate if not the host dialled")  # fmt: skip
    if not token:
        return
    add_option(parser, "--token-file", default="", env=TOKEN_FILE_ENV,
               help=f"file holding the bearer token for {what} (or set {TOKEN_ENV})")  # fmt: skip
