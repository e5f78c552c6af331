"""The credentials file and the small pure pieces of auth (no servers)."""

from __future__ import annotations

import pytest

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
