"""The console's pure parts, no I/O: where sign-in may send a person, what the inbox marks
as not decidable, how money and run progress are shown, how the Health page turns two
metric scrapes into totals and rates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.console.approvals import blocked_reason
from gateway.console.health import Sample, parse, parse_targets, summarise
from gateway.console.reconciliation import progress
from gateway.console.sessions import csrf_token_for, tokens_match
from gateway.console.signin import safe_next
from gateway.console.web import _money
from gateway.keystore import VerifiedKey
from gateway.settings import Settings


@pytest.mark.parametrize("wanted, kept", [
    ("/console/payments/abc", "/console/payments/abc"),
    ("/console", "/console"),
    ("https://evil.example/console", "/console/"),
    ("//evil.example/console", "/console/"),
    ("/console//evil.example", "/console/"),
    ("/console/../v1/payments", "/console/"),
    ("/console/sign-in", "/console/"),
    ("/v1/payments", "/console/"),
    ("/console/x?y=1", "/console/"),
    (None, "/console/"),
])
def test_sign_in_only_ever_redirects_inside_the_console(wanted, kept):
    assert safe_next(wanted) == kept


def console_of(principal: str, scopes=("approvals:read", "approvals:decide")):
    key = VerifiedKey(key_id="k" * 16, tenant_id="t", principal=principal, scopes=frozenset(scopes))
    return SimpleNamespace(principal=principal, api=SimpleNamespace(may=lambda scope: scope in key.scopes))


def test_the_inbox_says_why_a_request_cannot_be_decided():
    approval = {"maker": "mia", "requested_by": "mia", "decisions": [{"principal": "olga"}],
                "approver_principals": [], "approver_scopes": []}
    assert "You made this request" in blocked_reason(console_of("mia"), approval)
    assert "already decided" in blocked_reason(console_of("olga"), approval)
    assert "approvals:decide" in blocked_reason(console_of("nick", scopes=("approvals:read",)), approval)
    assert blocked_reason(console_of("nick"), approval) is None
    assert "other approvers" in blocked_reason(console_of("nick"), {**approval, "approver_principals": ["cfo"]})
    # Whoever filed a request on another's behalf is a maker too.
    assert "You made this request" in blocked_reason(console_of("ann"), {**approval, "requested_by": "ann"})


def test_csrf_tokens_belong_to_one_session():
    assert tokens_match(csrf_token_for("session-a"), csrf_token_for("session-a"))
    assert not tokens_match(csrf_token_for("session-b"), csrf_token_for("session-a"))
    assert not tokens_match("", csrf_token_for("session-a")) and not tokens_match(None, "")


def test_money_is_shown_in_major_units_grouped_with_its_currency():
    assert _money(150_000, "EUR") == "1,500.00 EUR"
    assert _money(-5, "EUR") == "-0.05 EUR"
    assert _money(1_000, "JPY") == "1,000 JPY"
    assert _money(1_234_567, "KWD") == "1,234.567 KWD"
    assert _money(None, "EUR") == "—"
    assert _money(100, "???") == "100 ??? (minor units)"


def test_run_progress_follows_its_stages():
    assert progress({"status": "queued", "stage": None}) == 0
    assert 0 < progress({"status": "running", "stage": "keyed"}) < progress({"status": "running", "stage": "fuzzy"})
    assert progress({"status": "completed", "stage": "done"}) == progress({"status": "failed", "stage": "x"}) == 100


API = """
# TYPE clearhouse_http_requests_total counter
clearhouse_http_requests_total{service="payments",method="GET",route="/v1/payments",status="200"} 90.0
clearhouse_http_requests_total{service="payments",method="POST",route="/v1/payments",status="503"} %d.0
"""
RELAY = """
clearhouse_outbox_backlog{service="payments"} 7.0
clearhouse_outbox_oldest_unpublished_age_seconds{service="payments"} 12.5
"""
CONSUMER = """
clearhouse_consumer_lag{consumer="approvals",topic="payments.events",partition="0"} 3.0
clearhouse_consumer_lag{consumer="approvals",topic="payments.events",partition="1"} 2.0
clearhouse_dlq_messages_total{consumer="approvals",topic="payments.events"} 1.0
"""


def test_health_sums_lag_per_topic_and_rates_errors_between_two_scrapes():
    before = {"payments-api": Sample(100.0, parse(API % 10))}
    now = {"payments-api": Sample(110.0, parse(API % 30)), "payments-relay": Sample(110.0, parse(RELAY)),
           "approvals-consumer": Sample(110.0, parse(CONSUMER))}
    services = {s.service: s for s in summarise(now, before)}
    payments = services["payments"]
    assert (payments.requests, payments.server_errors) == (120, 30) and payments.error_ratio == 0.25
    assert payments.error_rate_per_s == pytest.approx(2.0) and payments.rate_window_s == 10
    assert (payments.outbox_backlog, payments.outbox_oldest_age_s, payments.relay_publish_errors) == (7, 12.5, 0)
    assert services["approvals"].consumers == [{"service": "approvals", "consumer": "approvals",
                                                "topic": "payments.events", "lag": 5.0, "dlq": 1.0,
                                                "failures": 0.0}]
    first_look = {s.service: s for s in summarise(now, {})}
    assert first_look["payments"].error_rate_per_s is None  # one sample gives totals, not a rate


def test_health_targets_come_from_the_setting_or_the_upstreams():
    named = Settings(database_url="postgresql://x@h/d",
                     console_metrics_targets="payments-relay=http://127.0.0.1:9101/metrics, bad ,x=")
    assert parse_targets(named) == [("payments-relay", "http://127.0.0.1:9101/metrics")]
    default = parse_targets(Settings(database_url="postgresql://x@h/d", payments_url="http://p:1/"))
    assert ("payments-api", "http://p:1/metrics") in default and len(default) == 4
