"""Who is calling: principals, tenants and their limits, and the credentials file.

Plain data and file parsing only (no gRPC), so the scheduler's domain core can read a
tenant's limits without knowing how the caller authenticated. The interceptor that fills in
the principal of each call lives in services/common/auth.py.

The credentials file (``--auth-file``, TOML) holds SHA-256 digests of tokens, never the
tokens themselves, so it is not a secret: leaking it does not let anyone in. See SECURITY.md.

.. code-block:: toml

    [tenant_defaults]          # limits of every tenant that sets none of its own
    requests_per_s = 50        # per scheduler replica; 0: no limit
    burst = 100                # requests allowed at once before the rate applies
    max_queued_jobs = 1000     # unfinished (queued or running) jobs, across replicas
    max_streams = 64           # open Generate/Stream calls, per scheduler replica

    [tenants.acme]             # overrides for one tenant
    requests_per_s = 200
    best_priority = 0          # lowest priority value acme may ask for (lower runs first)

    [[clients]]                # a client token; several tokens may share a tenant
    tenant = "acme"
    token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

    [[workers]]                # a worker credential: a token, or an mTLS certificate's CN
    name = "gpu-pool"
    token_sha256 = "..."
    # cert_common_name = "ssjf-worker"
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class Kind(StrEnum):
    CLIENT = "client"
    WORKER = "worker"
    # Auth is off: the caller may do anything a client or a worker may.
    ANYONE = "anyone"


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant quotas; 0 (or None) means no limit."""

    requests_per_s: float = 0.0
    burst: int = 0  # 0: one second's worth of requests_per_s
    max_queued_jobs: int = 0
    max_streams: int = 0
    # The lowest (most urgent) priority value the tenant may ask for; None: any.
    best_priority: int | None = None


UNLIMITED = TenantLimits()


@dataclass(frozen=True)
class Principal:
    kind: Kind
    name: str  # worker name, or the tenant for clients; for logs
    tenant: str = ""  # clients only; "" is the single tenant of a stack without auth
    limits: TenantLimits = field(default=UNLIMITED)

    def may_act_as(self, kind: Kind) -> bool:
        return self.kind in (kind, Kind.ANYONE)


ANONYMOUS = Principal(Kind.ANYONE, "anonymous")


def token_digest(token: str) -> str:
    """What the credentials file stores for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


class CredentialsError(ValueError):
    """The credentials file is malformed; the message says where."""


@dataclass(frozen=True)
class Credentials:
    """The parsed credentials file: principals by token digest and by certificate CN."""

    by_token_digest: dict[str, Principal]
    workers_by_common_name: dict[str, Principal]

    @classmethod
    def parse(cls, text: str, source: str = "credentials") -> Credentials:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise CredentialsError(f"{source}: not valid TOML ({error})") from None
        defaults = _limits(
            data.get("tenant_defaults", {}), UNLIMITED, f"{source} [tenant_defaults]"
        )
        tenants: dict[str, TenantLimits] = {}
        for tenant, table in data.get("tenants", {}).items():
            _check_tenant(tenant, source)
            tenants[tenant] = _limits(table, defaults, f"{source} [tenants.{tenant}]")
        by_token: dict[str, Principal] = {}
        by_cn: dict[str, Principal] = {}
        for index, entry in enumerate(data.get("clients", [])):
            where = f"{source} [[clients]] #{index + 1}"
            tenant = str(entry.get("tenant", ""))
            _check_tenant(tenant, where)
            digest = _digest(entry, where)
            if digest in by_token:
                raise CredentialsError(f"{where}: token_sha256 is used twice")
            by_token[digest] = Principal(Kind.CLIENT, tenant, tenant, tenants.get(tenant, defaults))
        for index, entry in enumerate(data.get("workers", [])):
            where = f"{source} [[workers]] #{index + 1}"
            worker = Principal(Kind.WORKER, str(entry.get("name", f"worker-{index + 1}")))
            common_name = entry.get("cert_common_name")
            if common_name:
                by_cn[str(common_name)] = worker
            if "token_sha256" in entry or not common_name:
                digest = _digest(entry, where)
                if digest in by_token:
                    raise CredentialsError(f"{where}: token_sha256 is used twice")
                by_token[digest] = worker
        return cls(by_token, by_cn)

    @classmethod
    def load(cls, path: Path) -> Credentials:
        return cls.parse(path.read_text(), str(path))


def _check_tenant(tenant: str, where: str) -> None:
    if not TENANT_NAME.match(tenant):
        raise CredentialsError(
            f"{where}: tenant {tenant!r} must be 1-64 letters, digits or ._- "
            "(it becomes part of Redis keys)"
        )


def _digest(entry: dict[str, Any], where: str) -> str:
    digest = str(entry.get("token_sha256", "")).lower()
    if not _SHA256_HEX.match(digest):
        raise CredentialsError(
            f"{where}: token_sha256 must be 64 hex digits (sha256 of the token; "
            "deploy/secrets/generate.sh writes them)"
        )
    return digest


def _limits(table: dict[str, Any], base: TenantLimits, where: str) -> TenantLimits:
    known = {item.name for item in fields(TenantLimits)}
    unknown = set(table) - known
    if unknown:
        raise CredentialsError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    values = {name: getattr(base, name) for name in known}
    for name, value in table.items():
        if name == "best_priority":
            values[name] = int(value)
            continue
        if not isinstance(value, int | float) or value < 0:
            raise CredentialsError(f"{where}: {name} must be a number >= 0, got {value!r}")
        values[name] = float(value) if name == "requests_per_s" else int(value)
    return TenantLimits(**values)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit to print or log."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


def read_secret(file_variable: str, value_variable: str | None = None) -> str:
    """A secret from the file named by ``$file_variable`` (a mounted secret), else from
    ``$value_variable``; "" when neither is set. Never from a flag: flags show in ``ps``."""
    path = os.environ.get(file_variable)
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(value_variable, "").strip() if value_variable else ""
