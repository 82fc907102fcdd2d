"""A payment never leaves without its reservation: a hold the ledger voids (it expired)
before anything went to the processor fails the payment; after a request left it can
only be reported, never silently dropped."""

from __future__ import annotations

import logging

from services.payments import service
from services.payments.consumers import HANDLERS
from services.payments.schemas import HoldVoided
from services.payments.tests.integration.harness import rows, scalar
from services.payments.tests.integration.test_webhooks import approved_with_hold, status_of
from shared.uow import run_in_transaction


async def void(sessionmaker, pid: str, *, hold_id: str | None = None, reason: str = "expired") -> None:
    await run_in_transaction(sessionmaker, lambda uow: service.record_hold_voided(
        uow=uow, tenant_id="t1", voided=HoldVoided(hold_id=hold_id or f"hold_{pid[:8]}", payment_id=pid,
                                                   reason=reason)))


def test_the_consumer_listens_for_voided_holds():
    assert "ledger.hold.voided.v1" in HANDLERS


async def test_an_expired_hold_before_submission_fails_the_payment(app, private_pem, sessionmaker):
    pid = await approved_with_hold(app, private_pem, sessionmaker)
    await void(sessionmaker, pid)
    payment = await status_of(app, private_pem, pid)
    assert (payment["status"], payment["failure_reason"]) == ("failed", "hold_expired")
    assert await scalar(sessionmaker, "SELECT status FROM processor_attempts WHERE payment_id = :id",
                        id=pid) == "cancelled"
    events = await rows(sessionmaker, "SELECT type, actor FROM events WHERE aggregate_id = :id ORDER BY seq", id=pid)
    assert (events[-1].type, events[-1].actor) == ("payment.failed.v1", "service:ledger")


async def test_a_void_of_another_hold_or_after_our_own_failure_changes_nothing(app, private_pem, sessionmaker):
    pid = await approved_with_hold(app, private_pem, sessionmaker)
    await void(sessionmaker, pid, hold_id="someone_elses_hold")
    assert (await status_of(app, private_pem, pid))["status"] == "approved"
    await void(sessionmaker, pid)
    await void(sessionmaker, pid)  # the same news again
    types = [r.type for r in await rows(sessionmaker, "SELECT type FROM events WHERE aggregate_id = :id", id=pid)]
    assert types.count("payment.failed.v1") == 1


async def test_a_void_after_the_request_left_is_reported_not_hidden(app, private_pem, sessionmaker, caplog):
    pid = await approved_with_hold(app, private_pem, sessionmaker)
    # The submitter claims it: from here on the request may be on the wire.
    claimed = await run_in_transaction(sessionmaker, lambda uow: service.claim_submissions(
        uow=uow, cipher=app.state.payee_cipher, limit=100, lease_s=30))
    assert pid in {str(s.attempt.payment_id) for s in claimed}
    with caplog.at_level(logging.ERROR, logger="services.payments.service"):
        await void(sessionmaker, pid)
    assert (await status_of(app, private_pem, pid))["status"] == "approved"
    assert any("may be at the processor" in r.getMessage() for r in caplog.records)
