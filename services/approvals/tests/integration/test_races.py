"""Concurrent decisions on one request, and decisions racing the expiry job, against real
PostgreSQL: whatever the interleaving, exactly one outcome event is ever written."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from services.approvals import jobs
from services.approvals.tests.integration.conftest import events_of, open_payment, scalar
from services.approvals.verify import verify

OUTCOMES = ("approval.granted.v1", "approval.rejected.v1", "approval.expired.v1")


def decide(http, approval_id, headers, decision):
    return http.post(f"/v1/approvals/{approval_id}/decisions",
                     json={"decision": decision, "reason": f"{decision} in a race"}, headers=headers)


async def test_concurrent_approve_and_reject_give_exactly_one_outcome(http, as_, sessionmaker, settings, tenant,
                                                                      database):
    for _ in range(8):
        request = await open_payment(sessionmaker, settings, tenant, amount=100_000)  # one approval decides
        deciders = [("ann", "approve"), ("rob", "reject"), ("cat", "approve"), ("rex", "reject")]
        responses = await asyncio.gather(*(decide(http, request.id, as_(p), d) for p, d in deciders))

        codes = sorted(r.status_code for r in responses)
        assert codes == [201, 409, 409, 409], [r.text for r in responses]
        winner = next(r.json() for r in responses if r.status_code == 201)
        assert {r.json()["code"] for r in responses if r.status_code == 409} == {"approval_not_pending"}
        outcome = await events_of(sessionmaker, request.id, types=OUTCOMES)
        expected = "approval.granted.v1" if winner["decision"] == "approve" else "approval.rejected.v1"
        assert [e.type for e in outcome] == [expected]
    assert await verify(database.app_url) == []


async def test_a_quorum_race_never_grants_twice_or_after_a_rejection(http, as_, sessionmaker, settings, tenant,
                                                                     database):
    for _ in range(8):
        request = await open_payment(sessionmaker, settings, tenant, amount=2_000_000)  # two approvals
        deciders = [("ann", "approve"), ("bob", "approve"), ("cat", "approve"), ("rob", "reject")]
        responses = await asyncio.gather(*(decide(http, request.id, as_(p), d) for p, d in deciders))

        assert all(r.status_code in (201, 409) for r in responses), [r.text for r in responses]
        outcome = await events_of(sessionmaker, request.id, types=OUTCOMES)
        assert len(outcome) == 1
        status = await scalar(sessionmaker, "SELECT status FROM approval_requests WHERE id = :id", id=request.id)
        decided = await scalar(sessionmaker, "SELECT count(*) FROM approval_decisions WHERE request_id = :id",
                               id=request.id)
        assert decided == sum(r.status_code == 201 for r in responses)
        assert (status, outcome[0].type) in {("granted", "approval.granted.v1"), ("rejected", "approval.rejected.v1")}
    assert await verify(database.app_url) == []


async def test_a_decision_racing_the_expiry_job_leaves_one_outcome(http, as_, sessionmaker, settings, tenant):
    for _ in range(6):
        request = await open_payment(sessionmaker, settings, tenant, amount=100_000)
        # The job sees the deadline as passed, the decider does not: both may act.
        after_deadline = request.expires_at + timedelta(seconds=1)
        decision, _ = await asyncio.gather(
            decide(http, request.id, as_("ann"), "approve"),
            jobs.run_once(sessionmaker, now=after_deadline, batch_size=50),
        )
        outcome = await events_of(sessionmaker, request.id, types=OUTCOMES)
        assert len(outcome) == 1
        if decision.status_code == 201:
            assert outcome[0].type == "approval.granted.v1"
        else:
            assert decision.json()["code"] == "approval_not_pending"
            assert outcome[0].type == "approval.expired.v1"
