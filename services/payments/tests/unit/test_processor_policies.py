"""Webhook signatures, retry backoff and the circuit breaker, without I/O."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, strategies as st

from services.payments.connector import WebhookRejected, sign, verify_signature
from services.payments.jobs import BreakerState, CircuitBreaker, retry_delay
from services.payments.service import InvalidCursor, decode_cursor

SECRET = b"whsec_unit"


@given(st.binary(max_size=2_000), st.integers(min_value=1_600_000_000, max_value=2_000_000_000),
       st.integers(min_value=-300, max_value=300))
def test_a_signature_verifies_within_the_tolerance(body, timestamp, skew):
    header = sign(SECRET, timestamp=timestamp, body=body)
    verify_signature(SECRET, header=header, body=body, now=timestamp + skew, tolerance_s=300)


@given(st.binary(max_size=500), st.binary(min_size=1, max_size=20))
def test_any_change_to_the_body_is_refused(body, extra):
    header = sign(SECRET, timestamp=1_700_000_000, body=body)
    with pytest.raises(WebhookRejected):
        verify_signature(SECRET, header=header, body=body + extra, now=1_700_000_000, tolerance_s=300)


@pytest.mark.parametrize("skew", [-301, 301, 10**9])
def test_outside_the_tolerance_is_refused(skew):
    header = sign(SECRET, timestamp=1_700_000_000, body=b"{}")
    with pytest.raises(WebhookRejected):
        verify_signature(SECRET, header=header, body=b"{}", now=1_700_000_000 + skew, tolerance_s=300)


@given(st.text(max_size=300))
def test_arbitrary_headers_are_refused_never_crash(header):
    with pytest.raises(WebhookRejected):
        verify_signature(SECRET, header=header, body=b"{}", now=1_700_000_000, tolerance_s=300)


def test_one_matching_signature_among_several_is_enough():
    good = sign(SECRET, timestamp=1_700_000_000, body=b"{}")
    header = f"{good},v1={'0' * 64}"
    verify_signature(SECRET, header=header, body=b"{}", now=1_700_000_000, tolerance_s=300)


@given(st.integers(min_value=1, max_value=100), st.floats(min_value=0.01, max_value=5),
       st.floats(min_value=0.1, max_value=120), st.integers())
def test_backoff_grows_is_capped_and_jittered(tries, base, cap, seed):
    delay = retry_delay(tries, base_s=base, cap_s=cap, rng=random.Random(seed))
    step = min(cap, base * 2 ** (tries - 1))
    assert step / 2 <= delay <= step


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_failures_and_lets_one_trial_through_after_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(name="unit", failure_threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now = 9.9
    assert not breaker.allow() and breaker.retry_after() == pytest.approx(0.1)
    clock.now = 10
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # only one
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now = 20
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow() and breaker.allow()


def test_a_success_resets_the_failure_count():
    breaker = CircuitBreaker(name="unit", failure_threshold=3, cooldown_s=10, clock=Clock())
    for _ in range(10):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


@given(st.text(max_size=100))
def test_a_cursor_we_did_not_issue_is_refused_cleanly(cursor):
    try:
        decode_cursor(cursor)
    except InvalidCursor:
        pass
