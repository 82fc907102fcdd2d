"""Approval requests as a state machine: over random decision sequences the outcome never
violates the policy (the property the issue asks for), the events tell the same story
as the state, and the timers act once."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from hypothesis import given, strategies as st

from services.approvals import domain
from services.approvals.domain import (
    ApprovalRequest, ApprovalStatus, DecisionRefused, LoggedEvent, Policy, Rule, Verdict, quorum_problems, rebuild,
)
from services.approvals.schemas import EVENT_SCHEMAS
from services.approvals.tests.unit.strategies import PRINCIPALS, SCOPES, T0, at, rules, subjects

OUTCOMES = {domain.GRANTED, domain.REJECTED, domain.EXPIRED}

steps = st.lists(st.tuples(st.sampled_from(PRINCIPALS), st.sampled_from(list(Verdict)),
                           st.frozensets(st.sampled_from(SCOPES), max_size=3)), max_size=12)


def open_request(rule: Rule, subject) -> ApprovalRequest:
    policy = Policy(id=domain.policy_id_for("t1", "payment"), tenant_id="t1", subject_type="payment", version=3,
                    rules=(rule,))
    return ApprovalRequest.open(subject=subject, policy=policy, now=T0, default_expire_after_s=3600,
                                correlation_id="corr-open")


def log_of(events, tenant="t1") -> list[LoggedEvent]:
    return [LoggedEvent(type=e.type, aggregate_id=e.aggregate_id, tenant_id=tenant, payload=e.payload,
                        occurred_at=e.occurred_at, correlation_id=f"corr-{i}" if e.type == domain.DECIDED
                        else "corr-open", reason=e.reason) for i, e in enumerate(events)]


@given(rule=rules(catch_all=True, name="only"), subject=subjects(with_amount=True), sequence=steps)
def test_no_decision_sequence_violates_the_policy(rule, subject, sequence):
    request = open_request(rule, subject)
    events = request.pull_events()
    for i, (principal, verdict, scopes) in enumerate(sequence):
        before = (request.status, list(request.decisions))
        try:
            request.decide(principal=principal, scopes=scopes, verdict=verdict, reason=f"reason {i}",
                           now=at(i + 1), correlation_id=f"corr-{len(events)}")
        except DecisionRefused:
            assert (request.status, list(request.decisions)) == before  # a refusal records nothing
            assert request.events == []
            continue
        # Accepted only from a pending request, by an eligible non-maker deciding for the first time.
        assert before[0] is ApprovalStatus.PENDING
        assert not request.is_maker(principal) and request.may_decide(principal, scopes)
        assert [d.principal for d in before[1]].count(principal) == 0
        events += request.pull_events()

        assert quorum_problems(request) == []
        approvers = set(request.approvers)
        rejected = any(d.verdict is Verdict.REJECT for d in request.decisions)
        if request.status is ApprovalStatus.GRANTED:
            assert len(approvers) >= rule.required_approvals and not rejected
        elif request.status is ApprovalStatus.REJECTED:
            assert rejected and request.decisions[-1].verdict is Verdict.REJECT
        else:
            assert len(approvers) < rule.required_approvals and not rejected

    outcome_events = [e for e in events if e.type in OUTCOMES]
    assert len(outcome_events) == (0 if request.status is ApprovalStatus.PENDING else 1)
    assert len([e for e in events if e.type == domain.DECIDED]) == len(request.decisions)
    for event in events:
        EVENT_SCHEMAS[event.type].model_validate(event.payload)
        assert event.payload["payment_id"] == subject.subject_id

    rebuilt = rebuild(log_of(events))
    assert rebuilt.problems == []
    again = rebuilt.requests[request.id]
    assert (again.status, again.approvers, again.resolved_at, again.expires_at) == (
        request.status, request.approvers, request.resolved_at, request.expires_at)
    assert [(d.id, d.principal, d.verdict, d.reason, d.decided_at) for d in again.decisions] == [
        (d.id, d.principal, d.verdict, d.reason, d.decided_at) for d in request.decisions]


@given(subject=subjects(with_amount=True))
def test_a_rule_that_needs_no_approval_grants_at_once_as_the_policy(subject):
    request = open_request(Rule("small", 0), subject)
    [event] = request.pull_events()
    assert request.status is ApprovalStatus.GRANTED and request.resolved_at == T0
    assert (event.type, event.actor, event.payload["auto"], event.payload["approvers"]) == (
        domain.GRANTED, "system:policy", True, [])
    assert "rule small of policy version 3" in event.reason
    with pytest.raises(domain.RequestNotPending):
        request.decide(principal="ann", scopes=frozenset(), verdict=Verdict.APPROVE, reason=None, now=at(1),
                       correlation_id=None)
    assert rebuild(log_of([event])).requests[request.id].status is ApprovalStatus.GRANTED


def test_the_maker_is_refused_even_after_the_outcome():
    request = open_request(Rule("one", 1), _subject())
    request.decide(principal="ann", scopes=frozenset(), verdict=Verdict.APPROVE, reason=None, now=at(1),
                   correlation_id=None)
    for maker in ("maker", "filer"):
        with pytest.raises(domain.MakerMayNotDecide):
            request.decide(principal=maker, scopes=frozenset(), verdict=Verdict.APPROVE, reason=None, now=at(2),
                           correlation_id=None)


def test_a_rejection_needs_a_reason():
    request = open_request(Rule("one", 1), _subject())
    with pytest.raises(ValueError, match="reason"):
        request.decide(principal="ann", scopes=frozenset(), verdict=Verdict.REJECT, reason=None, now=at(1),
                       correlation_id=None)


def test_expiry_comes_once_and_only_after_the_deadline():
    request = open_request(Rule("two", 2), _subject())
    request.pull_events()
    with pytest.raises(domain.RequestNotPending):
        request.expire(now=request.expires_at - timedelta(microseconds=1))
    with pytest.raises(domain.RequestPastDeadline):
        request.decide(principal="ann", scopes=frozenset(), verdict=Verdict.APPROVE, reason=None,
                       now=request.expires_at, correlation_id=None)
    request.expire(now=request.expires_at)
    [event] = request.pull_events()
    assert (event.type, event.actor, request.status) == (domain.EXPIRED, "job:approval-expiry", ApprovalStatus.EXPIRED)
    with pytest.raises(domain.RequestNotPending):
        request.expire(now=request.expires_at + timedelta(days=1))


def test_escalation_comes_once_while_pending():
    policy = Policy(id=uuid.uuid4(), tenant_id="t1", subject_type="payment", version=1, rules=(Rule("one", 1),),
                    expire_after_seconds=7200, escalate_after_seconds=3600)
    request = ApprovalRequest.open(subject=_subject(), policy=policy, now=T0, default_expire_after_s=60,
                                   correlation_id=None)
    assert (request.escalate_at, request.expires_at) == (at(3600), at(7200))
    request.escalate(now=at(3600))
    with pytest.raises(domain.RequestNotPending):
        request.escalate(now=at(3601))
    assert [e.type for e in request.pull_events()] == [domain.REQUESTED, domain.ESCALATED]


def test_rebuild_reports_a_second_outcome_instead_of_applying_it():
    request = open_request(Rule("one", 1), _subject())
    request.decide(principal="ann", scopes=frozenset(), verdict=Verdict.APPROVE, reason=None, now=at(1),
                   correlation_id=None)
    events = request.pull_events()
    forged = [*events, domain.DomainEvent(domain.REJECTED, domain.AGGREGATE, str(request.id),
                                          {"rejected_by": "eve", "reason": "late"}, occurred_at=at(2))]
    rebuilt = rebuild(log_of(forged))
    assert rebuilt.requests[request.id].status is ApprovalStatus.GRANTED
    assert rebuilt.problems == [f"approval {request.id}: approval.rejected.v1 after it was already granted"]


def _subject():
    return domain.Subject(tenant_id="t1", subject_type="payment", subject_id="p1", amount=100_000, currency="EUR",
                          metadata={}, maker="maker", requested_by="filer")
