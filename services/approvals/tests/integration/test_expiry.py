"""Expiry and escalation: the job lets time run out on pending requests, once, under each
request's own tenant, and a request past its deadline takes no decisions."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from sqlalchemy import text

from services.approvals import jobs
from services.approvals.tests.integration.conftest import eventually, events_of, open_payment, scalar


async def test_an_overdue_request_expires_once(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=2_000_000)
    half_way = await http.post(f"/v1/approvals/{request.id}/decisions", json={"decision": "approve", "reason": "ok"},
                               headers=as_("early-bird"))
    assert half_way.json()["approval"]["status"] == "pending"
    after_deadline = request.expires_at + timedelta(seconds=1)

    await jobs.run_once(sessionmaker, now=request.expires_at - timedelta(seconds=1), batch_size=10)
    assert await scalar(sessionmaker, "SELECT status FROM approval_requests WHERE id = :id", id=request.id) == "pending"
    await jobs.run_once(sessionmaker, now=after_deadline, batch_size=10)
    await jobs.run_once(sessionmaker, now=after_deadline + timedelta(hours=1), batch_size=10)

    expired = await events_of(sessionmaker, request.id, types=("approval.expired.v1",))
    assert len(expired) == 1
    assert expired[0].actor == "job:approval-expiry"
    assert expired[0].payload["payment_id"] == request.subject_id
    assert expired[0].payload["approvers"] == ["early-bird"]
    assert expired[0].correlation_id == request.correlation_id
    assert await scalar(sessionmaker, "SELECT tenant_id FROM events WHERE type = 'approval.expired.v1' "
                                      "AND aggregate_id = :id", id=str(request.id)) == tenant
    late = await http.post(f"/v1/approvals/{request.id}/decisions", json={"decision": "approve", "reason": "late"},
                           headers=as_("checker"))
    assert late.status_code == 409 and late.json()["approval_status"] == "expired"


async def test_past_its_deadline_a_request_takes_no_decision_even_before_the_job_runs(http, as_, sessionmaker,
                                                                                     settings, tenant):
    short = settings.model_copy(update={"approval_expire_after_s": 1})
    request = await open_payment(sessionmaker, short, tenant, amount=100_000)
    await asyncio.sleep(1.1)

    late = await http.post(f"/v1/approvals/{request.id}/decisions", json={"decision": "approve", "reason": "late"},
                           headers=as_("checker"))

    assert late.status_code == 409 and late.json()["code"] == "approval_expired"
    assert await scalar(sessionmaker, "SELECT count(*) FROM approval_decisions WHERE request_id = :id",
                        id=request.id) == 0


async def test_the_job_loop_expires_requests_and_forgets_old_idempotency_keys(sessionmaker, settings, tenant):
    short = settings.model_copy(update={"approval_expire_after_s": 1, "approval_jobs_interval_s": 0.1})
    request = await open_payment(sessionmaker, short, tenant, amount=100_000)
    async with sessionmaker() as session, session.begin():
        await session.execute(text(
            "INSERT INTO idempotency_keys (tenant_id, principal, method, path, key, request_hash, status, "
            "response_status, created_at) VALUES (:t, 'p', 'POST', '/v1/approvals', 'old', 'h', 'completed', 201, "
            "now() - interval '3 days')"), {"t": tenant})
    stop = asyncio.Event()
    task = asyncio.create_task(jobs.run_jobs(settings=short, sessionmaker=sessionmaker, stop=stop))
    try:
        await eventually(lambda: scalar(sessionmaker, "SELECT status = 'expired' FROM approval_requests "
                                                      "WHERE id = :id", id=request.id), timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert [e.type for e in await events_of(sessionmaker, request.id)] == ["approval.requested.v1",
                                                                           "approval.expired.v1"]
    assert await scalar(sessionmaker, "SELECT count(*) FROM idempotency_keys WHERE tenant_id = :t", t=tenant) == 0


async def test_the_escalation_notice_comes_once_before_expiry(http, as_, sessionmaker, tenant):
    policy = {"reason": "payees need a nudge", "expire_after_seconds": 7200, "escalate_after_seconds": 3600,
              "rules": [{"name": "one_approver", "required_approvals": 1}]}
    assert (await http.put("/v1/approvals/policies/payee", json=policy, headers=as_("admin"))).status_code == 200
    created = (await http.post("/v1/approvals", json={"subject_type": "payee", "subject_id": "p-esc"},
                               headers=as_("filer"))).json()
    opened = (await http.get(f"/v1/approvals/{created['id']}", headers=as_("auditor"))).json()
    escalate_at = datetime.fromisoformat(opened["escalate_at"])
    expires_at = datetime.fromisoformat(opened["expires_at"])
    assert expires_at - escalate_at == timedelta(seconds=3600)

    await jobs.run_once(sessionmaker, now=escalate_at + timedelta(seconds=1), batch_size=10)
    await jobs.run_once(sessionmaker, now=escalate_at + timedelta(seconds=2), batch_size=10)
    await jobs.run_once(sessionmaker, now=expires_at, batch_size=10)

    trail = [(e.type, e.actor) for e in await events_of(sessionmaker, created["id"])]
    assert trail == [("approval.requested.v1", "user:filer"), ("approval.escalated.v1", "job:approval-escalation"),
                     ("approval.expired.v1", "job:approval-expiry")]
