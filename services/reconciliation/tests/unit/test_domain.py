"""Matching rules, ageing and the read model's facts, without I/O."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st
from pydantic import ValidationError

from services.reconciliation.domain import (
    STATUS_RANK, MatchRule, Rules, ageing_bucket, age_days, tolerance_confidence, within_tolerance,
)
from services.reconciliation.schemas import BreakResolve, PaymentEventIn, RulesPublic, TransactionPostedIn
from services.reconciliation.service import encode_lines, ledger_posting, payment_fact
from services.reconciliation.statements import StatementLine


def test_passes_run_in_priority_order_and_exact_always_runs():
    assert Rules().passes() == [MatchRule.EXACT, MatchRule.TOLERANCE, MatchRule.ONE_TO_MANY, MatchRule.FUZZY]
    assert Rules(one_to_many=False, fuzzy=False).passes() == [MatchRule.EXACT, MatchRule.TOLERANCE]


def test_stored_rules_ignore_what_this_version_does_not_know():
    assert Rules.of({"date_window_days": 5, "from_the_future": True}) == Rules(date_window_days=5)
    assert Rules.of(None) == Rules()


@given(st.integers(1, 10**12), st.integers(0, 10**6), st.integers(0, 1000), st.integers(-10**6, 10**6))
def test_tolerance_is_the_larger_of_the_absolute_and_the_relative_drift(expected, minor, bps, drift):
    rules = Rules(amount_tolerance_minor=minor, amount_tolerance_bps=bps)
    allowed = max(minor, expected * bps // 10_000)
    assert within_tolerance(rules=rules, expected=expected, actual=expected + drift) == (abs(drift) <= allowed)


def test_the_default_is_to_the_cent():
    assert within_tolerance(rules=Rules(), expected=1000, actual=1000)
    assert not within_tolerance(rules=Rules(), expected=1000, actual=1001)


@given(st.integers(1, 10**9), st.integers(0, 10**9), st.integers(0, 10**9), st.integers(-31, 31),
       st.integers(0, 31))
def test_confidence_falls_with_drift_and_stays_in_bounds(expected, drift, more, days, window):
    closer = tolerance_confidence(expected=expected, actual=expected + drift, days=days, window=window)
    farther = tolerance_confidence(expected=expected, actual=expected + drift + more, days=days, window=window)
    assert 0.5 <= farther <= closer <= 0.99


def test_ageing():
    now = datetime(2026, 3, 10, tzinfo=timezone.utc)
    assert [ageing_bucket(age_days(opened_at=now - timedelta(days=d), now=now)) for d in (0, 2, 5, 20, 40)] == [
        "0d", "1-3d", "4-7d", "8-30d", ">30d"]


def test_rules_are_bounded():
    with pytest.raises(ValidationError):
        RulesPublic(date_window_days=400)
    with pytest.raises(ValidationError):
        RulesPublic(amount_tolerance_bps=-1)
    with pytest.raises(ValidationError):
        RulesPublic(fuzzy_min_prefix=4)


def test_a_manual_match_carries_its_match_and_nothing_else_does():
    BreakResolve(resolution="manual_match", reason="same payment", match={"target_id": str(uuid.uuid4())})
    with pytest.raises(ValidationError):
        BreakResolve(resolution="manual_match", reason="same payment")
    with pytest.raises(ValidationError):
        BreakResolve(resolution="accepted", reason="fee", match={"line_no": 3})
    with pytest.raises(ValidationError):
        BreakResolve(resolution="accepted", reason="   ")


def _event(**fields):
    return PaymentEventIn(payment_id=uuid.uuid4(), amount=1000, currency="EUR", **fields)


def test_a_settlement_brings_its_value_date_and_a_status_seq_orders_it():
    fact = payment_fact(tenant_id="t", event_type="payment.settled.v1", payload=_event(value_date=date(2026, 3, 2)),
                        seq=42, event_time=None)
    assert (fact.status, fact.status_seq, fact.value_date) == ("settled", 42, date(2026, 3, 2))


def test_without_a_producer_seq_the_status_rank_keeps_the_order():
    settled = payment_fact(tenant_id="t", event_type="payment.settled.v1", payload=_event(value_date=date(2026, 3, 2)),
                           seq=None, event_time=None)
    submitted = payment_fact(tenant_id="t", event_type="payment.submitted.v1", payload=_event(), seq=None,
                             event_time=None)
    assert settled.status_seq > submitted.status_seq == STATUS_RANK["submitted"]


def test_a_refund_event_records_the_refund_and_not_its_amount_as_the_payments():
    payload = _event(refund_id=uuid.uuid4(), refunded_total=1000)
    fact = payment_fact(tenant_id="t", event_type="payment.refunded.v1", payload=payload, seq=9,
                        event_time=datetime(2026, 3, 3, 1, tzinfo=timezone.utc))
    assert (fact.amount, fact.refund_amount, fact.status, fact.refund_value_date) == (
        None, 1000, "partially_refunded", date(2026, 3, 3))


def test_a_ledger_posting_is_its_debits_and_a_reversal_is_negative():
    payment = uuid.uuid4()
    entries = [{"direction": "debit", "amount": 500, "currency": "EUR"},
               {"direction": "credit", "amount": 500, "currency": "EUR"}]
    posted = ledger_posting(tenant_id="t", transaction=TransactionPostedIn(
        transaction_id=uuid.uuid4(), payment_id=str(payment), entries=entries, posted_at=datetime.now(timezone.utc),
        kind="hold_posted"))
    assert (posted.amount, posted.currency, posted.payment_id) == (500, "EUR", payment)
    reversed_ = ledger_posting(tenant_id="t", transaction=TransactionPostedIn(
        transaction_id=uuid.uuid4(), payment_id=str(payment), entries=entries, posted_at=datetime.now(timezone.utc),
        kind="reversal", reverses_id=uuid.uuid4()))
    assert (reversed_.amount, reversed_.kind) == (-500, "reversal")
    assert ledger_posting(tenant_id="t", transaction=TransactionPostedIn(
        transaction_id=uuid.uuid4(), payment_id="not-a-payment", entries=entries,
        posted_at=datetime.now(timezone.utc))) is None


def test_a_reference_that_is_its_uuid_is_stored_once():
    reference = str(uuid.uuid4())
    line = StatementLine(1, 1, 2, date(2026, 3, 2), None, "DBIT", 900, 900, "EUR", reference, reference, "b1")
    assert encode_lines([line], prefix="") == f"1\t1\t2\t2026-03-02\t\\N\tDBIT\t900\t900\tEUR\t\\N\t{reference}\tb1\n".encode()


def test_copy_rows_escape_backslashes_and_write_nulls():
    line = StatementLine(1, 1, None, date(2026, 3, 2), None, "DBIT", None, 900, "EUR", "a\\b", None, None)
    assert encode_lines([line], prefix="t\ts\t2026-03-02\t") == (
        b"t\ts\t2026-03-02\t1\t1\t\\N\t2026-03-02\t\\N\tDBIT\t\\N\t900\tEUR\ta\\\\b\t\\N\t\\N\n")
