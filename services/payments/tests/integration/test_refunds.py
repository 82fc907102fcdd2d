"""Refunds of settled payments, in full or in part, through the sandbox processor: each
is its own object with its own lifecycle and events; together they never exceed what
settled, even when requested at the same moment."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services.payments.tests.integration.harness import asgi_client, eventually, rows, running_flow
from services.payments.verify import verify


@pytest.fixture(scope="module")
async def flow(db, platform, internal_keys, sessionmaker, tmp_path_factory):
    async with running_flow(db, platform, internal_keys, sessionmaker, tmp_path_factory.mktemp("refunds")) as found:
        yield found


async def settled_payment(flow, amount: int = 12_500) -> str:
    pid = (await flow.create(amount=amount))["id"]
    await flow.grant(pid)
    await flow.wait_status(pid, "approved")
    await flow.hold(pid, amount=amount)
    await flow.wait_status(pid, "settled")
    return pid


async def refund(flow, pid: str, body: dict | None = None, *, tenant: str = "t1", key: str | None = None):
    async with asgi_client(flow.app) as http:
        return await http.post(f"/v1/payments/{pid}/refunds", json=body,
                               headers=flow.headers(tenant=tenant, idempotency_key=key))


async def refund_status(flow, pid: str, refund_id: str, *statuses: str) -> dict:
    async def reached():
        async with asgi_client(flow.app) as http:
            found = (await http.get(f"/v1/payments/{pid}/refunds/{refund_id}", headers=flow.headers())).json()
        return found if found["status"] in statuses else None

    return await eventually(reached)


async def test_partial_then_full_refund(flow, db):
    pid = await settled_payment(flow)
    first = await refund(flow, pid, {"amount": 5_000, "reason": "damaged goods"})
    assert first.status_code == 201, first.text
    created = first.json()
    assert (created["status"], created["amount"], created["currency"]) == ("pending", 5_000, "EUR")
    assert first.headers["location"] == f"/v1/payments/{pid}/refunds/{created['id']}"
    await refund_status(flow, pid, created["id"], "succeeded")
    payment = await flow.wait_status(pid, "partially_refunded")
    assert payment["refunded_amount"] == 5_000

    too_much = await refund(flow, pid, {"amount": 7_501})
    assert too_much.status_code == 422 and too_much.json()["code"] == "refund_exceeds_refundable_amount"
    assert too_much.json()["refundable_amount"] == 7_500

    rest = await refund(flow, pid)  # no amount: everything still refundable
    assert rest.status_code == 201 and rest.json()["amount"] == 7_500
    await refund_status(flow, pid, rest.json()["id"], "succeeded")
    payment = await flow.wait_status(pid, "refunded")
    assert payment["refunded_amount"] == 12_500

    again = await refund(flow, pid, {"amount": 1})
    assert again.status_code == 409 and again.json()["code"] == "payment_not_refundable"

    refunded = await rows(flow.sessionmaker, "SELECT payload FROM events WHERE aggregate_id = :id "
                                             "AND type = 'payment.refunded.v1' ORDER BY seq", id=pid)
    assert [(r.payload["refund_id"], r.payload["amount"]) for r in refunded] == [
        (created["id"], 5_000), (rest.json()["id"], 7_500)]
    assert {"payment_id", "refund_id", "amount", "currency", "debit_account_id"} <= refunded[0].payload.keys()
    refund_events = await rows(flow.sessionmaker, "SELECT type FROM events WHERE aggregate_type = 'refund' "
                                                  "AND aggregate_id = :id ORDER BY seq", id=created["id"])
    assert [r.type for r in refund_events] == ["refund.created.v1", "refund.submitted.v1", "refund.succeeded.v1"]
    async with asgi_client(flow.app) as http:
        listed = (await http.get(f"/v1/payments/{pid}/refunds", headers=flow.headers())).json()
        history = (await http.get(f"/v1/payments/{pid}/history", headers=flow.headers())).json()
    assert [r["id"] for r in listed["data"]] == [created["id"], rest.json()["id"]]
    assert "refund.succeeded.v1" in [h["type"] for h in history["data"]]
    assert await verify(db.app_url) == []


async def test_simultaneous_refunds_never_exceed_the_settled_amount(flow):
    pid = await settled_payment(flow)
    answers = await asyncio.gather(*(refund(flow, pid, {"amount": 7_000}) for _ in range(5)))
    assert sorted(a.status_code for a in answers) == [201, 422, 422, 422, 422]


async def test_a_failed_refund_gives_the_amount_back(flow):
    pid = await settled_payment(flow)
    failing = await refund(flow, pid, {"amount": 1_013})  # sandbox trigger: refund ending in 13 fails
    failed = await refund_status(flow, pid, failing.json()["id"], "failed")
    assert failed["failure_reason"] == "processor_insufficient_funds"
    assert (await flow.get(pid))["status"] == "settled"
    full = await refund(flow, pid)
    assert full.status_code == 201 and full.json()["amount"] == 12_500


async def test_refund_requests_are_idempotent_and_tenant_scoped(flow):
    pid = await settled_payment(flow)
    key = f"refund-{uuid.uuid4()}"
    first = await refund(flow, pid, {"amount": 100}, key=key)
    again = await refund(flow, pid, {"amount": 100}, key=key)
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    stranger = await refund(flow, pid, {"amount": 100}, tenant="t2")
    assert stranger.status_code == 404
    async with asgi_client(flow.app) as http:
        missing = await http.get(f"/v1/payments/{pid}/refunds/{uuid.uuid4()}", headers=flow.headers())
        other = await http.get(f"/v1/payments/{pid}/refunds/{first.json()['id']}", headers=flow.headers(tenant="t2"))
    assert missing.status_code == 404 and missing.json()["code"] == "refund_not_found"
    assert other.status_code == 404
