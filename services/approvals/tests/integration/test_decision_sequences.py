"""The property the issue asks for, end to end: random sequences of decisions through the
API, against real PostgreSQL, never produce an outcome the policy does not allow, and the
tables always equal the rebuild of the event log."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from services.approvals.tests.integration.conftest import events_of, open_payment
from services.approvals.verify import verify

OUTCOMES = ("approval.granted.v1", "approval.rejected.v1", "approval.expired.v1")
DECISIONS = st.lists(st.tuples(st.sampled_from(["maker", "ann", "bob", "cat"]), st.sampled_from(["approve", "reject"])),
                     max_size=7)


@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(amount=st.sampled_from([50_000, 100_000, 1_000_000, 9_000_000]), decisions=DECISIONS)
async def test_random_decision_sequences_never_violate_the_policy(http, as_, sessionmaker, settings, tenant, database,
                                                                  amount, decisions):
    request = await open_payment(sessionmaker, settings, tenant, amount=amount, maker="maker")
    for principal, decision in decisions:
        response = await http.post(f"/v1/approvals/{request.id}/decisions",
                                   json={"decision": decision, "reason": "because"}, headers=as_(principal))
        assert response.status_code in (201, 403, 409), response.text

    detail = (await http.get(f"/v1/approvals/{request.id}", headers=as_("auditor"))).json()
    deciders = [d["principal"] for d in detail["decisions"]]
    approvals = {d["principal"] for d in detail["decisions"] if d["decision"] == "approve"}
    rejections = [d for d in detail["decisions"] if d["decision"] == "reject"]
    assert "maker" not in deciders and len(deciders) == len(set(deciders))
    if detail["status"] == "granted":
        assert len(approvals) >= detail["required_approvals"] and not rejections
    elif detail["status"] == "rejected":
        assert len(rejections) == 1 and detail["decisions"][-1]["decision"] == "reject"
    else:
        assert detail["status"] == "pending"
        assert len(approvals) < detail["required_approvals"] and not rejections
    outcomes = await events_of(sessionmaker, request.id, types=OUTCOMES)
    assert len(outcomes) == (0 if detail["status"] == "pending" else 1)
    assert await verify(database.app_url) == []
