"""The gateway's pure parts: key format, token bucket arithmetic, route → scope table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.keys import check_scopes, hash_secret, key_id_of, new_key, parse_key, secret_matches
from gateway.ratelimit import TokenBucketLimiter
from gateway.routes import resolve


def test_a_new_key_parses_back_to_its_parts_and_only_its_secret_matches():
    key, parts = new_key("live")
    assert key.startswith("ch_live_") and len(key) == len("ch_live_") + 16 + 1 + 43
    assert parse_key(key) == parts
    assert secret_matches(parts.secret, hash_secret(parts.secret))
    other, _ = new_key("live")
    assert not secret_matches(parse_key(other).secret, hash_secret(parts.secret))
    assert key_id_of(key) == key_id_of(f"ch_live_{parts.key_id}") == key_id_of(parts.key_id) == parts.key_id


@given(st.text(max_size=120))
def test_anything_else_is_not_a_key(text):
    parsed = parse_key(text)
    assert parsed is None or text.startswith(("ch_live_", "ch_test_"))


def test_scopes_are_checked_against_the_known_list():
    assert check_scopes(["ledger:read", " ledger:read", "payments:write"]) == ["ledger:read", "payments:write"]
    with pytest.raises(ValueError, match="unknown scope"):
        check_scopes(["ledger:admin"])
    with pytest.raises(ValueError, match="at least one"):
        check_scopes([])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_allows_the_burst_then_refuses_then_refills():
    clock = Clock()
    limiter = TokenBucketLimiter(rate_per_s=2, burst=3, clock=clock)
    decisions = [limiter.take("k") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    refused = decisions[-1]
    assert refused.retry_after_s == 1 and refused.headers()["Retry-After"] == "1"
    assert refused.headers()["RateLimit-Limit"] == "3" and refused.reset_s == 2
    clock.now += 0.5  # one token back at 2/s
    assert limiter.take("k").allowed and not limiter.take("k").allowed
    assert limiter.take("other").allowed  # buckets are per key


def test_idle_buckets_are_forgotten_when_the_table_is_full():
    clock = Clock()
    limiter = TokenBucketLimiter(rate_per_s=1, burst=1, max_buckets=10, clock=clock)
    for i in range(10):
        limiter.take(f"k{i}")
    clock.now += 5
    limiter.take("new")
    assert len(limiter._buckets) == 1


@pytest.mark.parametrize(("method", "path", "service", "scope"), [
    ("GET", "/v1/payments", "payments", "payments:read"),
    ("GET", "/v1/payments/p1/timeline", "payments", "payments:read"),
    ("POST", "/v1/payments", "payments", "payments:write"),
    ("POST", "/v1/payments/p1/cancel", "payments", "payments:write"),
    ("POST", "/v1/payments/webhooks/sandbox", "payments", None),
    ("GET", "/v1/approvals", "approvals", "approvals:read"),
    ("POST", "/v1/approvals", "approvals", "approvals:request"),
    ("POST", "/v1/approvals/a1/decisions", "approvals", "approvals:decide"),
    ("PUT", "/v1/approvals/policies/payment", "approvals", "approvals:admin"),
    ("GET", "/v1/ledger/accounts/a1/balance", "ledger", "ledger:read"),
    ("POST", "/v1/ledger/transactions", "ledger", "ledger:write"),
    ("GET", "/v1/reconciliation/breaks", "reconciliation", "reconciliation:read"),
    ("POST", "/v1/reconciliation/statements", "reconciliation", "reconciliation:write"),
])
def test_each_contract_path_has_its_service_and_scope(method, path, service, scope):
    route = resolve(method, path)
    assert (route.service, route.scope) == (service, scope)


@pytest.mark.parametrize("path", ["/v1/payments/../ledger/accounts", "/v1/ledger//accounts", "/v1/ledger/./x",
                                  "/v2/payments", "/v1/users", "/v1/ledger/a/..", "/internal/timeline", "/"])
def test_paths_no_service_owns_or_that_could_be_reinterpreted_are_refused(path):
    assert resolve("GET", path) is None


def test_only_statement_uploads_get_the_large_body_limit():
    assert resolve("POST", "/v1/reconciliation/statements").large_body
    assert not resolve("POST", "/v1/reconciliation/runs").large_body


def test_the_gateway_refuses_to_start_without_a_usable_signing_key():
    from gateway.api import create_app
    from gateway.settings import Settings

    with pytest.raises(ValueError, match="INTERNAL_TOKEN_PRIVATE_KEY"):
        create_app(Settings(database_url="postgresql://nobody@127.0.0.1:1/none", internal_token_private_key=None))
    with pytest.raises(ValueError):
        create_app(Settings(database_url="postgresql://nobody@127.0.0.1:1/none",
                            INTERNAL_TOKEN_PRIVATE_KEY="-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"))
