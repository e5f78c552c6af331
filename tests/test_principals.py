"""The credentials file and the small pure pieces of auth (no servers)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from services.common.config import redis_url
from services.common.pki import generate
from services.common.principals import (
    Credentials,
    CredentialsError,
    Kind,
    TenantLimits,
    redact_url,
    token_digest,
)
from services.scheduler.models import scoped_request_id


def test_tokens_map_to_tenants_with_their_limits() -> None:
    credentials = Credentials.parse(
        f"""
[tenant_defaults]
requests_per_s = 5
max_streams = 2
[tenants.acme]
requests_per_s = 50
best_priority = -3
[[clients]]
tenant = "acme"
token_sha256 = "{token_digest("a")}"
[[clients]]
tenant = "globex"
token_sha256 = "{token_digest("g")}"
[[workers]]
name = "pool"
token_sha256 = "{token_digest("w")}"
[[workers]]
name = "certified"
cert_common_name = "ssjf-worker"
"""
    )
    acme = credentials.by_token_digest[token_digest("a")]
    assert (acme.kind, acme.tenant) == (Kind.CLIENT, "acme")
    assert acme.limits == TenantLimits(requests_per_s=50, max_streams=2, best_priority=-3)
    globex = credentials.by_token_digest[token_digest("g")]
    assert globex.limits == TenantLimits(requests_per_s=5, max_streams=2)
    assert credentials.by_token_digest[token_digest("w")].kind is Kind.WORKER
    assert credentials.workers_by_common_name["ssjf-worker"].name == "certified"
    assert not acme.may_act_as(Kind.WORKER) and acme.may_act_as(Kind.CLIENT)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[[clients]]\ntenant = 'a/b'\ntoken_sha256 = '" + "0" * 64 + "'", "tenant 'a/b'"),
        ("[[clients]]\ntenant = 'a'\ntoken_sha256 = 'plaintext-token'", "64 hex digits"),
        ("[tenant_defaults]\nrequests_per_s = -1", "requests_per_s must be a number >= 0"),
        ("[tenant_defaults]\nmax_stream = 1", "unknown keys ['max_stream']"),
        ("[[clients]]\ntenant = 'a'\ntoken_sha256 = '" + "0" * 64 + "'\n"
         "[[clients]]\ntenant = 'b'\ntoken_sha256 = '" + "0" * 64 + "'", "used twice"),
        ("not toml [", "not valid TOML"),
    ],
)  # fmt: skip
def test_malformed_credentials_are_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(CredentialsError, match=None) as raised:
        Credentials.parse(text, "auth.toml")
    assert says in str(raised.value) and "auth.toml" in str(raised.value)


def test_request_ids_are_scoped_per_tenant_and_unchanged_without_one() -> None:
    assert scoped_request_id("acme", "req-1") == "acme/req-1"
    assert scoped_request_id("globex", "req-1") != scoped_request_id("acme", "req-1")
    assert scoped_request_id("", "req-1") == "req-1"
    assert scoped_request_id("acme", "") == ""


def test_passwords_are_redacted_from_urls() -> None:
    assert redact_url("rediss://ssjf:s3cret@redis:6379/0?ssl_ca_certs=/x") == (
        "rediss://ssjf:***@redis:6379/0?ssl_ca_certs=/x"
    )
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def _subcommand_help(name: str) -> str:
    from services.cli import build_parser

    [commands] = [
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    return " ".join(commands.choices[name].format_help().split())


@pytest.mark.parametrize("command", ["scheduler", "up", "export-completions"])
def test_every_redis_url_flag_warns_about_ps_and_hides_the_environments_password(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "rediss://ssjf:s3cret@redis:6379/0")
    shown = _subcommand_help(command)
    assert "--redis-url-file" in shown and "shows in ps" in shown
    assert "s3cret" not in shown


def test_the_redis_url_comes_from_its_file_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSJF_REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/0")
    url_file = tmp_path / "redis-url"
    url_file.write_text("rediss://ssjf:s3cret@redis:6379/0\n")
    args = argparse.Namespace(redis_url="redis://from-flag:6379/0", redis_url_file=str(url_file))
    assert redis_url(args) == "rediss://ssjf:s3cret@redis:6379/0"
    assert redis_url(argparse.Namespace(redis_url="", redis_url_file="")) == (
        "redis://from-env:6379/0"
    )
    monkeypatch.delenv("REDIS_URL")
    assert redis_url(argparse.Namespace(redis_url="", redis_url_file="")) == ""


# Files of `ssjf secrets` that hold a secret (keys, tokens, passwords), by path in --out.
_SECRET_FILES = [
    "ca.key",
    "scheduler.key",
    "worker-client.key",
    "scheduler-client.key",
    "tokens/demo.token",
    "tokens/worker.token",
    "redis-password",
    "redis-url",
]


@pytest.mark.parametrize(("readable_by_all", "redis_mode"), [(False, 0o600), (True, 0o644)])
def test_generated_secrets_are_0600_and_the_redis_acl_holds_no_password(
    tmp_path: Path, readable_by_all: bool, redis_mode: int
) -> None:
    """On a host every secret is its owner's alone, Redis's key and ACL file too. For a
    volume handed to another uid (``--owner``: compose) Redis's two files are readable by
    all, because Redis runs as a third uid; its ACL file then shows a digest, not the
    password."""
    generate(
        tmp_path,
        servers=["scheduler"],
        tenants=["demo"],
        redis_readable_by_all=readable_by_all,
    )
    for name in _SECRET_FILES:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    for name in ("redis/redis.key", "redis/users.acl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == redis_mode, name
    password = (tmp_path / "redis-password").read_text().strip()
    acl = (tmp_path / "redis" / "users.acl").read_text()
    assert password not in acl and f"#{token_digest(password)}" in acl
