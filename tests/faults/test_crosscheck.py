"""`clearhouse verify`'s checks across payments and the ledger (clearhouse/crosscheck.py),
on hand-made rows: each way money can be lost or moved twice is named, and states still
in flight are judged only after the grace period."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from clearhouse.crosscheck import _match

NOW = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
OLD, RECENT = NOW - timedelta(minutes=5), NOW - timedelta(seconds=1)


def payment(status: str, *, id: str = "p1", amount: int = 500, hold_id: str | None = "h1", updated_at=OLD) -> dict:
    return {"id": id, "tenant_id": "t", "status": status, "amount": amount, "hold_id": hold_id,
            "updated_at": updated_at}


def hold(status: str, *, payment_id: str = "p1", amount: int = 500, posted: int | None = None, resolved_at=OLD) -> dict:
    return {"id": "h1", "tenant_id": "t", "payment_id": payment_id, "status": status, "amount": amount,
            "amount_posted": (amount if status == "posted" else 0) if posted is None else posted,
            "created_at": OLD - timedelta(minutes=1), "resolved_at": None if status == "pending" else resolved_at}


def check(payments, holds) -> list[str]:
    return _match(payments, holds, snapshot=NOW, grace=timedelta(seconds=60))


@pytest.mark.parametrize("payments, holds", [
    ([payment("settled")], [hold("posted")]),
    ([payment("refunded")], [hold("posted")]),
    ([payment("failed", hold_id=None)], []),  # the ledger refused the hold
    ([payment("failed")], [hold("voided")]),
    ([payment("cancelled")], [hold("expired")]),
    ([payment("rejected", hold_id=None)], []),
    ([payment("approved", hold_id=None)], []),
    ([payment("submitted")], [hold("pending")]),
    ([payment("settled", updated_at=RECENT)], [hold("pending")]),  # the ledger is about to post it
    ([payment("failed", updated_at=RECENT)], [hold("pending")]),
    ([payment("submitted")], [hold("posted", resolved_at=RECENT)]),  # settled after payments was read
])
def test_consistent_or_still_in_flight_is_no_violation(payments, holds):
    assert check(payments, holds) == []


@pytest.mark.parametrize("payments, holds, words", [
    ([payment("settled")], [], "settled without a hold"),
    ([payment("settled")], [hold("voided")], "is voided, not posted"),
    ([payment("settled")], [hold("pending")], "is pending, not posted"),
    ([payment("settled")], [hold("posted", posted=400)], "posted 400"),
    ([payment("failed")], [hold("posted")], "is posted, not released"),
    ([payment("cancelled")], [hold("pending")], "is pending, not released"),
    ([payment("rejected")], [hold("pending")], "without an approval"),
    ([payment("submitted")], [hold("voided")], "already voided"),
    ([payment("settled", amount=600)], [hold("posted")], "its hold h1 is for 500"),
    ([payment("settled", hold_id="h9")], [hold("posted")], "records hold h9"),
    ([], [hold("posted", payment_id="ghost")], "payments does not know"),
])
def test_money_without_a_matching_payment_state_is_named(payments, holds, words):
    problems = check(payments, holds)
    assert problems and words in problems[0], problems
