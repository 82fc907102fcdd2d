"""The whole lifecycle through the service API, with the real sandbox processor on a
socket, the real broker carrying approval and ledger events, and real PostgreSQL:
approval → funds reserved → submit → webhook → settled, and every way it can go wrong."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services.payments.tests.integration.harness import asgi_client, eventually, rows, running_flow, scalar
from services.payments.verify import verify


@pytest.fixture(scope="module")
async def flow(db, platform, internal_keys, sessionmaker, tmp_path_factory):
    async with running_flow(db, platform, internal_keys, sessionmaker, tmp_path_factory.mktemp("sandbox")) as found:
        yield found


async def test_approval_reserve_submit_settle(flow, db):
    payment = await flow.create(reference="Invoice 1001")
    pid = payment["id"]
    await flow.grant(pid, approval_id="apr_1001")
    approved = await flow.wait_status(pid, "approved")
    assert approved["approval_id"] == "apr_1001"
    # Money never leaves before it is reserved: nothing goes to the processor yet.
    await asyncio.sleep(0.3)
    assert await scalar(flow.sessionmaker, "SELECT count(*) FROM processor_attempts WHERE payment_id = :id",
                        id=pid) == 0
    await flow.hold(pid)
    settled = await flow.wait_status(pid, "settled")
    assert settled["processor"] == "sandbox" and settled["processor_payment_id"].startswith("po_")
    assert settled["hold_id"] == f"hold_{pid[:8]}" and settled["value_date"] is not None
    assert settled["failure_reason"] is None
    assert await flow.event_types(pid) == ["payment.created.v1", "payment.approved.v1", "payment.funds_reserved.v1",
                                           "payment.submitted.v1", "payment.settled.v1"]
    history = await flow.history(pid)
    assert [h["status"] for h in history] == ["pending_approval", "approved", "approved", "submitted", "settled"]
    assert history[-1]["actor"] == "webhook:sandbox"
    events = {r.type: r.payload for r in await rows(
        flow.sessionmaker, "SELECT type, payload FROM events WHERE aggregate_id = :id", id=pid)}
    assert events["payment.approved.v1"] == {
        "payment_id": pid, "amount": 12_500, "currency": "EUR", "debit_account_id": "acct_customer_1",
        "approval_id": "apr_1001", "status": "approved"}
    assert {"payment_id", "amount", "currency", "processor", "processor_payment_id"} <= events[
        "payment.submitted.v1"].keys()
    assert {"payment_id", "amount", "currency", "debit_account_id", "processor_payment_id", "value_date"} <= events[
        "payment.settled.v1"].keys()
    attempt = (await rows(flow.sessionmaker, "SELECT status, tries FROM processor_attempts WHERE payment_id = :id",
                          id=pid))[0]
    assert (attempt.status, attempt.tries) == ("completed", 1)
    assert await verify(db.app_url) == []


async def test_insufficient_funds_fails_the_payment(flow):
    pid = (await flow.create())["id"]
    await flow.grant(pid)
    await flow.wait_status(pid, "approved")
    await flow.refuse_hold(pid, reason="insufficient_funds")
    failed = await flow.wait_status(pid, "failed")
    assert failed["failure_reason"] == "insufficient_funds"
    assert await flow.event_types(pid) == ["payment.created.v1", "payment.approved.v1", "payment.failed.v1"]
    assert await scalar(flow.sessionmaker, "SELECT count(*) FROM processor_attempts WHERE payment_id = :id",
                        id=pid) == 0


@pytest.mark.parametrize("expired, reason", [(False, "approval_rejected"), (True, "approval_expired")])
async def test_declined_approval_rejects_the_payment(flow, expired, reason):
    pid = (await flow.create())["id"]
    await flow.decline(pid, expired=expired)
    rejected = await flow.wait_status(pid, "rejected")
    assert rejected["failure_reason"] == reason
    history = await flow.history(pid)
    assert history[-1]["type"] == "payment.rejected.v1" and history[-1]["actor"] == "user:bob"


async def test_processor_failure_fails_the_payment(flow):
    pid = (await flow.create(amount=10_013))["id"]  # sandbox trigger: ends in 13 → AM04
    await flow.approved_and_reserved(pid)
    failed = await flow.wait_status(pid, "failed")
    assert failed["failure_reason"] == "processor_insufficient_funds"
    assert await flow.event_types(pid) == ["payment.created.v1", "payment.approved.v1", "payment.funds_reserved.v1",
                                           "payment.submitted.v1", "payment.failed.v1"]
    payload = (await rows(flow.sessionmaker, "SELECT payload FROM events WHERE aggregate_id = :id "
                                             "AND type = 'payment.failed.v1'", id=pid))[0].payload
    assert payload["hold_id"] == f"hold_{pid[:8]}"  # the ledger voids this hold


async def test_processor_refusal_at_submission_fails_without_moving_money(flow):
    pid = (await flow.create(amount=10_022))["id"]  # sandbox trigger: ends in 22 → 422 at once
    await flow.approved_and_reserved(pid)
    failed = await flow.wait_status(pid, "failed")
    assert failed["failure_reason"] == "payee_account_invalid" and failed["processor_payment_id"] is None
    assert "payment.submitted.v1" not in await flow.event_types(pid)
    status = await scalar(flow.sessionmaker, "SELECT status FROM processor_attempts WHERE payment_id = :id", id=pid)
    assert status == "rejected"


async def test_duplicate_and_out_of_order_webhooks_change_nothing_twice(flow):
    double = (await flow.create(reference="DOUBLE please"))["id"]
    late = (await flow.create(reference="OUTOFORDER please"))["id"]
    for pid in (double, late):
        await flow.approved_and_reserved(pid)
    for pid in (double, late):
        await flow.wait_status(pid, "settled")
    await eventually(lambda: scalar(flow.sessionmaker, "SELECT count(*) FROM processor_webhook_events "
                                                       "WHERE outcome = 'stale'"))
    for pid in (double, late):
        types = await flow.event_types(pid)
        assert types.count("payment.settled.v1") == 1 and types.count("payment.submitted.v1") == 1
    assert (await flow.get(late))["status"] == "settled"  # the late `processing` did not regress it


async def test_janitor_learns_the_outcome_when_no_webhook_comes(flow):
    pid = (await flow.create(reference="NOWEBHOOK"))["id"]
    await flow.approved_and_reserved(pid)
    settled = await flow.wait_status(pid, "settled", timeout=30)
    assert (await flow.history(pid))[-1]["actor"] == "job:janitor"
    assert settled["processor_payment_id"].startswith("po_")


async def test_a_timed_out_submission_is_resent_under_the_same_id_and_paid_once(flow):
    # The first call is stored by the sandbox but answers too late; no webhook tells us.
    pid = (await flow.create(reference="TIMEOUT NOWEBHOOK"))["id"]
    await flow.approved_and_reserved(pid)
    await flow.wait_status(pid, "settled", timeout=30)
    tries = await scalar(flow.sessionmaker, "SELECT tries FROM processor_attempts WHERE payment_id = :id", id=pid)
    assert tries >= 2  # the first call timed out and was sent again
    assert await sandbox_payouts(flow, pid) == 1
    assert (await flow.event_types(pid)).count("payment.submitted.v1") == 1


async def test_news_overtaking_a_slow_submission_wins_and_the_late_answer_changes_nothing(flow):
    # The webhooks arrive while our first call still waits for its answer.
    pid = (await flow.create(reference="TIMEOUT"))["id"]
    await flow.approved_and_reserved(pid)
    await flow.wait_status(pid, "settled", timeout=30)
    await asyncio.sleep(flow.settings.processor_timeout_s + 0.5)  # the slow call ends meanwhile
    assert await sandbox_payouts(flow, pid) == 1
    types = await flow.event_types(pid)
    assert types.count("payment.submitted.v1") == 1 and types.count("payment.settled.v1") == 1
    status = await scalar(flow.sessionmaker, "SELECT status FROM processor_attempts WHERE payment_id = :id", id=pid)
    assert status == "completed"


async def sandbox_payouts(flow, payment_id: str) -> int:
    return flow.sandbox_app.state.processor.db.execute(
        "SELECT count(*) FROM payouts WHERE end_to_end_id = ?", (payment_id,)).fetchone()[0]


async def test_transient_processor_errors_are_retried(flow):
    pid = (await flow.create(reference="FLAKY"))["id"]
    await flow.approved_and_reserved(pid)
    await flow.wait_status(pid, "settled", timeout=30)
    tries = await scalar(flow.sessionmaker, "SELECT tries FROM processor_attempts WHERE payment_id = :id", id=pid)
    assert tries == 3


async def test_duplicate_consumed_events_apply_once(flow):
    pid = (await flow.create())["id"]
    same = uuid.uuid4()
    await flow.grant(pid, event_id=same)
    await flow.grant(pid, event_id=same)  # a redelivery
    other = await flow.grant(pid)  # the same fact under another id
    await flow.wait_status(pid, "approved")
    holds = [await flow.hold(pid), await flow.hold(pid)]
    await flow.wait_status(pid, "settled")
    await flow.consumed(same, other, *holds)
    types = await flow.event_types(pid)
    assert types.count("payment.approved.v1") == 1 and types.count("payment.funds_reserved.v1") == 1


async def test_a_hold_for_a_cancelled_payment_submits_nothing(flow):
    pid = (await flow.create())["id"]
    await flow.grant(pid)
    await flow.wait_status(pid, "approved")
    async with asgi_client(flow.app) as http:
        cancelled = await http.post(f"/v1/payments/{pid}/cancel", json={"reason": "changed my mind"},
                                    headers=flow.headers())
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    await flow.consumed(await flow.hold(pid))
    await asyncio.sleep(2 * flow.settings.submit_poll_interval_s)  # a submitter round would have run
    assert (await flow.get(pid))["status"] == "cancelled"
    assert await scalar(flow.sessionmaker, "SELECT count(*) FROM processor_attempts WHERE payment_id = :id",
                        id=pid) == 0
    assert await flow.event_types(pid) == ["payment.created.v1", "payment.approved.v1", "payment.cancelled.v1"]


async def test_cancel_races_with_approval_one_outcome_each(flow):
    created = [(await flow.create())["id"] for _ in range(12)]

    async def cancel(pid):
        async with asgi_client(flow.app) as http:
            return await http.post(f"/v1/payments/{pid}/cancel", headers=flow.headers())

    grants = [flow.grant(pid) for pid in created]
    answers = await asyncio.gather(*(cancel(pid) for pid in created), *grants)
    assert all(answer.status_code == 200 for answer in answers[:len(created)])
    await flow.consumed(*answers[len(created):])  # every grant handled
    for pid in created:
        types = await flow.event_types(pid)
        # Cancelled before or after the approval, but never approved after a cancel.
        assert types in (["payment.created.v1", "payment.cancelled.v1"],
                         ["payment.created.v1", "payment.approved.v1", "payment.cancelled.v1"]), types
        assert (await flow.get(pid))["status"] == "cancelled"


async def test_cancel_is_refused_once_submission_started(flow):
    pid = (await flow.create(reference="NOWEBHOOK"))["id"]
    await flow.approved_and_reserved(pid)
    await eventually(lambda: scalar(flow.sessionmaker, "SELECT tries > 0 FROM processor_attempts "
                                                       "WHERE payment_id = :id", id=pid))
    async with asgi_client(flow.app) as http:
        response = await http.post(f"/v1/payments/{pid}/cancel", headers=flow.headers())
    assert response.status_code == 409 and response.json()["code"] == "payment_not_cancellable"


async def test_the_whole_database_satisfies_the_invariants(flow, db):
    # At any moment, stragglers (held webhooks, the janitor) in flight or not.
    assert await verify(db.app_url) == []
