"""The processor webhook endpoint: signatures and timestamp tolerance, deduplication by
event id under concurrency, rank order for out-of-order news, and answers that never
leak which check failed."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest

from services.payments import service
from services.payments.connector import ProcessorObject
from services.payments.domain import ProcessorState
from services.payments.schemas import ApprovalDecided, HoldPlaced
from services.payments.tests.integration.harness import WEBHOOK_SECRET, asgi_client, headers, payment_body, rows
from services.sandbox.processor import sign
from shared.uow import run_in_transaction

URL = "/v1/payments/webhooks/sandbox"


async def approved_with_hold(app, private_pem, sessionmaker, **overrides) -> str:
    """A payment whose funds are reserved, moved there by the same use cases the
    consumers run (the broker path is covered in test_lifecycle)."""
    async with asgi_client(app) as http:
        created = await http.post("/v1/payments", json=payment_body(**overrides), headers=headers(private_pem))
    pid = created.json()["id"]
    await run_in_transaction(sessionmaker, lambda uow: service.record_approval_granted(
        uow=uow, tenant_id="t1", decided=ApprovalDecided(approval_id="apr", payment_id=pid), actor="system:policy"))
    await run_in_transaction(sessionmaker, lambda uow: service.record_hold_placed(
        uow=uow, tenant_id="t1", hold=HoldPlaced(hold_id=f"hold_{pid[:8]}", payment_id=pid)))
    return pid


async def submitted(app, private_pem, sessionmaker) -> tuple[str, str, str]:
    """(payment id, attempt id, processor payout id) of a payment the processor accepted."""
    pid = await approved_with_hold(app, private_pem, sessionmaker)
    attempt_id = str((await rows(sessionmaker, "SELECT id FROM processor_attempts WHERE payment_id = :id",
                                 id=pid))[0].id)
    payout_id = f"po_{uuid.uuid4().hex[:12]}"
    update = ProcessorObject(kind="payout", processor_object_id=payout_id, request_id=uuid.UUID(attempt_id),
                             state=ProcessorState.PROCESSING)
    from services.payments.connector import ProcessorUpdate

    await run_in_transaction(sessionmaker, lambda uow: service.apply_processor_update(
        uow=uow, update=ProcessorUpdate(processor="sandbox", event_id=f"setup-{pid}", event_type="payout.processing",
                                        object=update), actor="job:submitter"))
    return pid, attempt_id, payout_id


def event(attempt_id: str, payout_id: str, status: str, *, event_id: str | None = None, **extra) -> bytes:
    obj = {"id": payout_id, "object": "payout", "request_id": attempt_id, "status": status, "amount": 12_500,
           "currency": "EUR", "value_date": "2025-01-31" if status == "settled" else None,
           "failure_code": "AC04" if status == "failed" else None, **extra}
    return orjson.dumps({"id": event_id or f"evt_{uuid.uuid4().hex}", "type": f"payout.{status}",
                         "created": int(time.time()), "data": {"object": obj}})


def signed(body: bytes, *, secret: str = WEBHOOK_SECRET, at: float | None = None) -> dict[str, str]:
    stamp = int(at if at is not None else time.time())
    return {"Clearhouse-Signature": sign(secret.encode(), timestamp=stamp, body=body),
            "Content-Type": "application/json"}


async def status_of(app, private_pem, pid: str) -> dict:
    async with asgi_client(app) as http:
        return (await http.get(f"/v1/payments/{pid}", headers=headers(private_pem))).json()


async def payment_event_types(sessionmaker, pid: str) -> list[str]:
    found = await rows(sessionmaker, "SELECT type FROM events WHERE aggregate_type = 'payment' "
                                     "AND aggregate_id = :id ORDER BY seq", id=pid)
    return [r.type for r in found]


async def test_a_signed_webhook_settles_the_payment(app, private_pem, sessionmaker):
    pid, attempt_id, payout_id = await submitted(app, private_pem, sessionmaker)
    body = event(attempt_id, payout_id, "settled")
    async with asgi_client(app) as http:
        response = await http.post(URL, content=body, headers=signed(body))
    assert response.status_code == 200 and response.json() == {"received": True, "outcome": "applied"}
    payment = await status_of(app, private_pem, pid)
    assert payment["status"] == "settled" and payment["value_date"] == "2025-01-31"


@pytest.mark.parametrize("forge", ["wrong_secret", "tampered", "too_old", "too_new", "missing", "garbage",
                                   "no_timestamp", "no_digest"])
async def test_forgeries_are_refused_with_401_and_change_nothing(app, private_pem, sessionmaker, forge):
    pid, attempt_id, payout_id = await submitted(app, private_pem, sessionmaker)
    body = event(attempt_id, payout_id, "settled")
    sent, sent_headers = body, signed(body)
    if forge == "wrong_secret":
        sent_headers = signed(body, secret="whsec_guess")
    elif forge == "tampered":
        sent = body.replace(b'"settled"', b'"failed"')
    elif forge == "too_old":
        sent_headers = signed(body, at=time.time() - 301)
    elif forge == "too_new":
        sent_headers = signed(body, at=time.time() + 301)
    elif forge == "missing":
        sent_headers = {"Content-Type": "application/json"}
    elif forge == "garbage":
        sent_headers = {"Clearhouse-Signature": b"t=abc,v1=\xc3\xa9\xff"}
    elif forge == "no_timestamp":
        sent_headers = {"Clearhouse-Signature": sent_headers["Clearhouse-Signature"].split(",")[1]}
    elif forge == "no_digest":
        sent_headers = {"Clearhouse-Signature": sent_headers["Clearhouse-Signature"].split(",")[0]}
    async with asgi_client(app) as http:
        response = await http.post(URL, content=sent, headers=sent_headers)
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "invalid_webhook_signature"
    assert response.json()["detail"] == "The webhook signature or its timestamp does not verify."
    assert (await status_of(app, private_pem, pid))["status"] == "submitted"


async def test_within_tolerance_is_accepted(app, private_pem, sessionmaker):
    pid, attempt_id, payout_id = await submitted(app, private_pem, sessionmaker)
    body = event(attempt_id, payout_id, "settled")
    async with asgi_client(app) as http:
        response = await http.post(URL, content=body, headers=signed(body, at=time.time() - 290))
    assert response.status_code == 200


async def test_signed_but_unreadable_is_400_and_unknown_processor_404(app):
    body = b'{"id": "evt_1", "type": "payout.settled", "data": {"object": {"status": "lost"}}}'
    async with asgi_client(app) as http:
        unreadable = await http.post(URL, content=body, headers=signed(body))
        not_json = await http.post(URL, content=b"\xff", headers=signed(b"\xff"))
        unknown = await http.post("/v1/payments/webhooks/acme", content=body, headers=signed(body))
    assert unreadable.status_code == 400 and unreadable.json()["code"] == "malformed_webhook"
    assert not_json.status_code == 400
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_processor"


async def test_concurrent_copies_of_one_event_apply_exactly_once(app, private_pem, sessionmaker):
    pid, attempt_id, payout_id = await submitted(app, private_pem, sessionmaker)
    body = event(attempt_id, payout_id, "settled", event_id="evt_same")
    async with asgi_client(app) as http:
        answers = await asyncio.gather(*(http.post(URL, content=body, headers=signed(body)) for _ in range(20)))
    outcomes = sorted(a.json()["outcome"] for a in answers)
    assert all(a.status_code == 200 for a in answers)
    assert outcomes == ["applied"] + ["duplicate"] * 19
    assert (await payment_event_types(sessionmaker, pid)).count("payment.settled.v1") == 1


async def test_the_same_news_under_another_event_id_is_a_duplicate_fact(app, private_pem, sessionmaker):
    pid, attempt_id, payout_id = await submitted(app, private_pem, sessionmaker)
    first, second = event(attempt_id, payout_id, "settled"), event(attempt_id, payout_id, "settled")
    async with asgi_client(app) as http:
        one = await http.post(URL, content=first, headers=signed(first))
        two = await http.post(URL, content=second, headers=signed(second))
    assert (one.json()["outcome"], two.json()["outcome"]) == ("applied", "duplicate")
    assert (await payment_event_types(sessionmaker, pid)).count("payment.settled.v1") == 1


async def test_out_of_order_news_never_regresses_a_final_state(app, private_pem, sessionmaker):
    pid, attempt_id, payout_id = await submitted(app, private_pem, sessionmaker)
    outcomes = []
    async with asgi_client(app) as http:
        for status in ("settled", "processing", "failed", "processing"):
            body = event(attempt_id, payout_id, status)
            outcomes.append((await http.post(URL, content=body, headers=signed(body))).json()["outcome"])
    assert outcomes == ["applied", "stale", "conflict", "stale"]
    assert (await status_of(app, private_pem, pid))["status"] == "settled"
    assert await payment_event_types(sessionmaker, pid) == [
        "payment.created.v1", "payment.approved.v1", "payment.funds_reserved.v1", "payment.submitted.v1",
        "payment.settled.v1"]


async def test_final_news_before_our_own_record_of_the_submission(app, private_pem, sessionmaker):
    # The processor may answer by webhook before the submitter has recorded its call.
    pid = await approved_with_hold(app, private_pem, sessionmaker)
    attempt_id = str((await rows(sessionmaker, "SELECT id FROM processor_attempts WHERE payment_id = :id",
                                 id=pid))[0].id)
    body = event(attempt_id, "po_early", "failed")
    async with asgi_client(app) as http:
        response = await http.post(URL, content=body, headers=signed(body))
    assert response.json()["outcome"] == "applied"
    payment = await status_of(app, private_pem, pid)
    assert payment["status"] == "failed" and payment["failure_reason"] == "payee_account_closed"
    assert (await payment_event_types(sessionmaker, pid))[-2:] == ["payment.submitted.v1", "payment.failed.v1"]


async def test_news_about_nothing_we_sent_is_acknowledged_and_recorded(app, sessionmaker):
    body = event(str(uuid.uuid4()), "po_stranger", "settled", event_id="evt_stranger")
    async with asgi_client(app) as http:
        first = await http.post(URL, content=body, headers=signed(body))
        again = await http.post(URL, content=body, headers=signed(body))
    assert (first.json()["outcome"], again.json()["outcome"]) == ("unmatched", "duplicate")
    found = await rows(sessionmaker, "SELECT outcome FROM processor_webhook_events WHERE event_id = 'evt_stranger'")
    assert [r.outcome for r in found] == ["unmatched"]
