"""Answers composed across services: the payment timeline merged from all four event logs,
oldest first; the payment with its approval and hold embedded; and what a caller gets when
a part fails (206 naming it) or when the payment itself cannot be checked (503/504).

The payment is created through the gateway. The other services' parts are written into
their own event logs as their use cases would write them (in the shape docs/events.md
fixes), so the merge is tested on known times without running the whole choreography.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta

import asyncpg
import httpx

from gateway.tests.conftest import assert_problem, bearer, tenant
from shared.db import plain_url

PAYMENT = {"amount": 12_500, "currency": "EUR", "debit_account_id": "acc-1",
           "payee": {"name": "Ada Lovelace", "iban": "DE89370400440532013000"}, "reference": "invoice 42"}
READ_ALL = ["payments:read", "payments:write", "approvals:read", "ledger:read"]


async def create_payment(client: httpx.AsyncClient, key: str) -> dict:
    response = await client.post("/v1/payments", json=PAYMENT,
                                 headers={**bearer(key), "Idempotency-Key": uuid.uuid4().hex})
    assert response.status_code == 201, response.text
    return response.json()


async def write_event(stack, service: str, *, tenant_id: str, payment_id: str, type_: str, at: datetime,
                      actor: str, data: dict, trace_id: str | None = None) -> None:
    conn = await asyncpg.connect(plain_url(stack.databases[service].owner_url))
    try:
        await conn.execute(
            "INSERT INTO events (id, tenant_id, aggregate_type, aggregate_id, type, schema_version, payload, actor, "
            "reason, correlation_id, traceparent, occurred_at) VALUES ($1, $2, $3, $4, $5, 1, $6::jsonb, $7, $8, "
            "$9, $10, $11)",
            uuid.uuid4(), tenant_id, type_.split(".")[0], str(uuid.uuid4()), type_, json.dumps(data), actor,
            data.get("reason"), "corr-1", f"00-{trace_id or uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01", at)
    finally:
        await conn.close()


async def payment_with_history(stack, client) -> tuple[str, str, str]:
    """A payment with events in all four services, interleaved in time."""
    t = tenant()
    key = await stack.key(tenant=t, scopes=READ_ALL)
    payment = await create_payment(client, key)
    pid, start = payment["id"], datetime.fromisoformat(payment["created_at"])
    parts = [
        ("ledger", "ledger.hold.placed.v1", 2, "service:ledger", {"hold_id": "h1", "amount": 12_500}),
        ("approvals", "approval.granted.v1", 1, "system:policy", {"approval_id": "a1", "auto": True}),
        ("reconciliation", "reconciliation.break.opened.v1", 4, "job:reconciliation", {"break_id": "b1"}),
        ("ledger", "ledger.hold.posted.v1", 3, "service:ledger", {"hold_id": "h1"}),
    ]
    for service, type_, seconds, actor, data in parts:
        await write_event(stack, service, tenant_id=t, payment_id=pid, type_=type_,
                          at=start + timedelta(seconds=seconds), actor=actor, data={"payment_id": pid, **data})
    # Another tenant's event about the same id must never show.
    await write_event(stack, "ledger", tenant_id="someone-else", payment_id=pid, type_="ledger.hold.voided.v1",
                      at=start + timedelta(seconds=5), actor="service:ledger", data={"payment_id": pid})
    return t, key, pid


async def test_the_timeline_merges_all_four_services_oldest_first(stack, client):
    _, key, pid = await payment_with_history(stack, client)
    response = await client.get(f"/v1/payments/{pid}/timeline", headers=bearer(key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["payment_id"] == pid and body["partial"] is False and body["missing"] == []
    events = body["events"]
    assert [(e["service"], e["type"]) for e in events] == [
        ("payments", "payment.created.v1"), ("approvals", "approval.granted.v1"),
        ("ledger", "ledger.hold.placed.v1"), ("ledger", "ledger.hold.posted.v1"),
        ("reconciliation", "reconciliation.break.opened.v1")]
    assert [e["actor"] for e in events][1:] == ["system:policy", "service:ledger", "service:ledger",
                                                "job:reconciliation"]
    assert events[0]["actor"].startswith("user:") and all(len(e["trace_id"]) == 32 for e in events)
    assert all(set(e) >= {"service", "type", "occurred_at", "actor", "reason", "correlation_id", "trace_id", "data"}
               for e in events)
    assert response.headers["ratelimit-limit"] and response.headers["request-id"]


async def test_another_tenants_payment_is_404_everywhere(stack, client):
    _, _, pid = await payment_with_history(stack, client)
    stranger = await stack.key(tenant=tenant(), scopes=READ_ALL)
    assert_problem(await client.get(f"/v1/payments/{pid}", headers=bearer(stranger)), 404, "payment_not_found")
    assert_problem(await client.get(f"/v1/payments/{pid}/timeline", headers=bearer(stranger)), 404,
                   "payment_not_found")
    assert_problem(await client.get(f"/v1/payments/{pid}?expand=approval", headers=bearer(stranger)), 404,
                   "payment_not_found")


async def test_a_part_that_times_out_is_missing_and_the_answer_is_206(stack, client):
    _, key, pid = await payment_with_history(stack, client)
    # A real stall: reconciliation's timeline query waits on a lock in its own database.
    locker = await asyncpg.connect(plain_url(stack.platform.superuser_url(stack.databases["reconciliation"])))
    try:
        async with stack.another_gateway(composition_timeout_s=0.5) as gw, \
                httpx.AsyncClient(base_url=gw.url) as http:
            async with locker.transaction():
                await locker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
                response = await http.get(f"/v1/payments/{pid}/timeline", headers=bearer(key))
    finally:
        await locker.close()
    assert response.status_code == 206, response.text
    body = response.json()
    assert body["partial"] is True and body["missing"] == ["reconciliation"]
    assert body["problems"][0]["code"] == "upstream_timeout"
    assert response.headers["cache-control"] == "no-store"
    assert [e["service"] for e in body["events"]] == ["payments", "approvals", "ledger", "ledger"]


async def test_a_stopped_service_is_missing_and_a_stopped_payments_is_503(stack, client):
    _, key, pid = await payment_with_history(stack, client)
    async with stack.another_service("ledger") as ledger, stack.another_service("payments") as payments:
        async with stack.another_gateway(ledger_url=ledger.url, payments_url=payments.url) as gw, \
                httpx.AsyncClient(base_url=gw.url) as http:
            assert (await http.get(f"/v1/payments/{pid}/timeline", headers=bearer(key))).status_code == 200
            await ledger.stop()
            partial = await http.get(f"/v1/payments/{pid}/timeline", headers=bearer(key))
            assert partial.status_code == 206, partial.text
            assert partial.json()["missing"] == ["ledger"]
            assert partial.json()["problems"][0]["code"] == "upstream_unavailable"
            assert "ledger" not in {e["service"] for e in partial.json()["events"]}
            await payments.stop()
            down = await http.get(f"/v1/payments/{pid}/timeline", headers=bearer(key))
            body = assert_problem(down, 503, "upstream_unavailable")
            assert body["service"] == "payments"


async def test_expand_embeds_what_the_payment_refers_to_and_needs_its_scopes(stack, client):
    t, key, pid = await payment_with_history(stack, client)
    plain = await client.get(f"/v1/payments/{pid}", headers=bearer(key))
    assert plain.status_code == 200 and "approval" not in plain.json()
    expanded = await client.get(f"/v1/payments/{pid}?expand=approval,ledger_hold", headers=bearer(key))
    assert expanded.status_code == 200, expanded.text
    body = expanded.json()
    assert body["id"] == pid and body["partial"] is False
    # Nothing has approved or reserved it yet (no consumers run here): both embed null.
    assert body["approval"] is None and body["ledger_hold"] is None
    assert_problem(await client.get(f"/v1/payments/{pid}?expand=refunds", headers=bearer(key)), 422,
                   "validation_error")
    narrow = await stack.key(tenant=t, principal="narrow", scopes=["payments:read"])
    refused = await client.get(f"/v1/payments/{pid}?expand=ledger_hold", headers=bearer(narrow))
    assert assert_problem(refused, 403, "insufficient_scope")["missing_scope"] == "ledger:read"
