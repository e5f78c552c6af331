"""``ssjf secrets``: every secret a secured deployment needs, generated at set-up.

Writes into one directory (never committed; see SECURITY.md):

* ``ca.crt``/``ca.key``: a private certificate authority (keep ``ca.key`` offline after).
* ``<service>.crt``/``.key`` for each server name (scheduler, predictor, worker, redis, ...),
  valid for that name, ``localhost`` and 127.0.0.1.
* ``worker-client.crt``/``.key`` (CN ``ssjf-worker``, a worker credential by mTLS) and
  ``scheduler-client.crt``/``.key`` (for the predictor's mutual TLS).
* ``tokens/<tenant>.token`` per client tenant and ``tokens/worker.token``: random bearer
  tokens, and ``auth.toml``, the scheduler's credentials file, holding only their SHA-256.
* ``redis/`` (certificate, key, ``ca.crt`` and ``users.acl``: an ACL user ``ssjf`` with
  the SHA-256 of its password, never the password, and the default user off): mount only
  this folder into the Redis container. ``redis-password`` and ``redis-url``
  (``rediss://ssjf:...@redis:6379/0?ssl_ca_certs=...``) are for the scheduler.

Keys, tokens, ``redis-password`` and ``redis-url`` are written 0600. So are Redis's key and
ACL file, except with ``--owner`` (a container volume whose files go to the SSJF image's
user): Redis runs as yet another uid (999 in redis:7.2-alpine, 10002 in ssjf-valkey) that
must read them, so there they are 0644, and the volume is their protection.

Certificates use ECDSA P-256 and live ``--days`` days. ``--force`` replaces everything: a
new CA, new tokens and a new Redis password, which every client, worker and Redis must be
given (a new deployment, not a rotation without restarts). Renewing a server certificate
under the same CA, which servers pick up without a restart, is SECURITY.md's "Rotated".
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.principals import token_digest

WORKER_CERT_CN = "ssjf-worker"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Written 0600 from the start: a key is never readable by others, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A private CA that signs server and client certificates into ``directory``."""

    def __init__(self, directory: Path, name: str = "ssjf-ca", days: int = 1) -> None:
        self.directory = directory
        self.days = days
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._cert = (
            self._builder(self._name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = directory / f"{name}.crt"
        self.key = directory / f"{name}.key"
        self.cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        _write_private(self.key, _key_bytes(self._key))

    def _builder(self, subject: x509.Name, public_key: object) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(getattr(self, "_name", subject))
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.days))
        )

    def issue(
        self,
        common_name: str,
        *,
        server: bool = True,
        file_stem: str = "",
        directory: Path | None = None,
    ) -> Issued:
        """A certificate for ``common_name``; a server's is valid for that name, localhost
        and 127.0.0.1; a client's (``server=False``) is for client authentication only."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = self._builder(subject, key.public_key())
        if server:
            names = [x509.DNSName(common_name), x509.DNSName("localhost"),
                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]  # fmt: skip
            builder = builder.add_extension(
                x509.SubjectAlternativeName(names), critical=False
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        stem, directory = file_stem or common_name, directory or self.directory
        issued = Issued(directory / f"{stem}.crt", directory / f"{stem}.key")
        _write_private(issued.key, _key_bytes(key))
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return issued


def new_token() -> str:
    return secrets.token_urlsafe(32)


def redis_acl(password: str) -> str:
    """Redis's ACL file: the default user off, user ``ssjf`` with all rights and the
    SHA-256 of ``password`` (``#<hex>``): whoever reads the file does not learn the password
    (a 256-bit random token, so its digest cannot be guessed back)."""
    return f"user default off\nuser ssjf on #{token_digest(password)} ~* &* +@all\n"


def generate(
    out: Path,
    *,
    servers: list[str],
    tenants: list[str],
    redis_host: str = "redis",
    days: int = 365,
    ca_path_in_container: str = "",
    redis_readable_by_all: bool = False,
) -> list[Path]:
    """Write every secret into ``out``; returns the files written. ``redis_readable_by_all``:
    Redis's key and ACL file 0644 instead of 0600, for Redis running as a uid that owns
    neither (see the module's docstring)."""
    ca = CertificateAuthority(out, "ca", days=days)
    for name in servers:
        if name != redis_host:
            ca.issue(name)
    ca.issue(WORKER_CERT_CN, server=False, file_stem="worker-client")
    ca.issue("scheduler-client", server=False, file_stem="scheduler-client")
    tokens = out / "tokens"
    client_entries = []
    for tenant in tenants:
        token = new_token()
        _write_private(tokens / f"{tenant}.token", token.encode() + b"\n")
        client_entries.append(
            f'[[clients]]\ntenant = "{tenant}"\ntoken_sha256 = "{token_digest(token)}"\n'
        )
    worker_token = new_token()
    _write_private(tokens / "worker.token", worker_token.encode() + b"\n")
    (out / "auth.toml").write_text(
        "# SSJF credentials: token digests only (not secret). Made by `ssjf secrets`.\n"
        "[tenant_defaults]\nrequests_per_s = 100\nburst = 200\nmax_queued_jobs = 10000\n"
        "max_streams = 1000\n\n"
        + "\n".join(client_entries)
        + f'\n[[workers]]\nname = "workers"\ntoken_sha256 = "{token_digest(worker_token)}"\n'
        f'\n[[workers]]\nname = "workers-mtls"\ncert_common_name = "{WORKER_CERT_CN}"\n'
    )
    password = new_token()
    _write_private(out / "redis-password", password.encode() + b"\n")
    # Redis's files apart in redis/: only this folder is mounted into the Redis container.
    redis_dir = out / "redis"
    redis_cert = ca.issue(redis_host, file_stem="redis", directory=redis_dir)
    acl = redis_dir / "users.acl"
    _write_private(acl, redis_acl(password).encode())
    (redis_dir / "ca.crt").write_bytes(ca.cert.read_bytes())
    if redis_readable_by_all:
        for path in (redis_cert.key, acl):
            path.chmod(0o644)
    redis_dir.chmod(0o755)
    ca_file = ca_path_in_container or str(ca.cert)
    _write_private(
        out / "redis-url",
        f"rediss://ssjf:{password}@{redis_host}:6379/0?ssl_ca_certs={ca_file}\n".encode(),
    )
    return sorted(path for path in out.rglob("*") if path.is_file())


def run(args: argparse.Namespace) -> int:
    """``ssjf secrets`` (flags: services/common/cli.py)."""
    if (args.out / "ca.crt").exists():
        if args.if_missing:
            print(f"secrets already in {args.out}; nothing to do")
            return 0
        if not args.force:
            print(
                f"{args.out} already holds secrets. --force replaces all of them (a new CA, "
                "new tokens, a new Redis password: every service needs the new files); to "
                "renew certificates only, see SECURITY.md",
                flush=True,
            )
            return 1
    args.out.mkdir(parents=True, exist_ok=True)
    args.out.chmod(0o711)  # others may reach redis/ (see above), not list or read the rest
    written = generate(
        args.out,
        servers=[name for name in args.servers.split(",") if name],
        tenants=[name for name in args.tenants.split(",") if name],
        redis_host=args.redis_host,
        days=args.days,
        ca_path_in_container=args.ca_path,
        # Files given to another user: Redis runs as a third one (the docstring).
        redis_readable_by_all=args.owner >= 0,
    )
    if args.owner >= 0:
        for path in [args.out, *args.out.rglob("*")]:
            os.chown(path, args.owner, args.owner)
    print(f"wrote {len(written)} files to {args.out} (never commit them):")
    for path in written:
        print(f"  {path.relative_to(args.out)}")
    return 0
