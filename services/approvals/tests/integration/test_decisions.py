"""Deciding through the API against real PostgreSQL: single and dual approval, the maker
blocked, one principal counting once, any rejection rejecting, finality, tenants apart."""

from __future__ import annotations

import uuid

from services.approvals.tests.integration.conftest import events_of, open_payment, scalar

OUTCOMES = ("approval.granted.v1", "approval.rejected.v1", "approval.expired.v1")


def decide(http, approval_id, headers, decision="approve", reason="looks right", **extra):
    body = {"decision": decision, "reason": reason}
    return http.post(f"/v1/approvals/{approval_id}/decisions", json=body, headers={**headers, **extra})


async def test_one_approver_grants_a_payment_from_1000(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=100_000)  # 1,000.00 EUR
    assert (request.status, request.required_approvals, request.rule) == ("pending", 1, "one_approver_from_1000")

    response = await decide(http, request.id, as_("checker", **{"X-Correlation-Id": "corr-decide-1"}))

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["principal"] == "checker" and body["decision"] == "approve"
    assert body["correlation_id"] == "corr-decide-1"
    assert body["approval"]["status"] == "granted" and body["approval"]["approvals"] == 1
    types = [e.type for e in await events_of(sessionmaker, request.id)]
    assert types == ["approval.requested.v1", "approval.decided.v1", "approval.granted.v1"]
    granted = (await events_of(sessionmaker, request.id, types=("approval.granted.v1",)))[0]
    assert granted.payload["payment_id"] == request.subject_id
    assert granted.payload["approvers"] == ["checker"] and granted.payload["auto"] is False
    assert granted.actor == "user:checker" and granted.correlation_id == "corr-decide-1"


async def test_two_distinct_approvers_grant_from_10000(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=1_000_000)  # 10,000.00 EUR
    assert request.required_approvals == 2

    first = await decide(http, request.id, as_("checker-1"))
    assert first.status_code == 201 and first.json()["approval"]["status"] == "pending"
    second = await decide(http, request.id, as_("checker-2"))

    assert second.status_code == 201 and second.json()["approval"]["status"] == "granted"
    granted = await events_of(sessionmaker, request.id, types=OUTCOMES)
    assert [(e.type, e.payload["approvers"]) for e in granted] == [("approval.granted.v1", ["checker-1", "checker-2"])]


async def test_the_maker_can_neither_approve_nor_reject(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=100_000, maker="mia")

    for decision in ("approve", "reject"):
        response = await decide(http, request.id, as_("mia"), decision=decision)
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "maker_cannot_decide"

    detail = (await http.get(f"/v1/approvals/{request.id}", headers=as_("auditor"))).json()
    assert detail["status"] == "pending" and detail["decisions"] == []
    assert [e["type"] for e in detail["history"]] == ["approval.requested.v1"]


async def test_whoever_filed_a_generic_request_cannot_decide_it_either(http, as_, tenant):
    created = await http.post("/v1/approvals", json={"subject_type": "payee", "subject_id": "payee-1",
                                                     "created_by": "alice"}, headers=as_("onboarding-service"))
    assert created.status_code == 201, created.text
    approval_id = created.json()["id"]
    assert created.headers["location"] == f"/v1/approvals/{approval_id}"
    assert created.json()["rule"] == "one_approver_without_amount"

    for maker in ("alice", "onboarding-service"):
        refused = await decide(http, approval_id, as_(maker))
        assert refused.status_code == 403 and refused.json()["code"] == "maker_cannot_decide"
    assert (await decide(http, approval_id, as_("bob"))).json()["approval"]["status"] == "granted"


async def test_one_principal_counts_once(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=2_500_000)

    assert (await decide(http, request.id, as_("checker"))).status_code == 201
    again = await decide(http, request.id, as_("checker"))
    changed_mind = await decide(http, request.id, as_("checker"), decision="reject", reason="second thoughts")

    assert again.status_code == changed_mind.status_code == 409
    assert again.json()["code"] == changed_mind.json()["code"] == "duplicate_decision"
    detail = (await http.get(f"/v1/approvals/{request.id}", headers=as_("auditor"))).json()
    assert (detail["status"], detail["approvals"], len(detail["decisions"])) == ("pending", 1, 1)


async def test_any_rejection_rejects_and_the_outcome_is_final(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=5_000_000)
    assert (await decide(http, request.id, as_("checker-1"))).status_code == 201

    rejected = await decide(http, request.id, as_("checker-2"), decision="reject", reason="payee unknown")
    assert rejected.status_code == 201 and rejected.json()["approval"]["status"] == "rejected"

    late = await decide(http, request.id, as_("checker-3"))
    assert late.status_code == 409 and late.json()["code"] == "approval_not_pending"
    assert late.json()["approval_status"] == "rejected"
    outcome = await events_of(sessionmaker, request.id, types=OUTCOMES)
    assert [(e.type, e.payload["rejected_by"], e.payload["reason"]) for e in outcome] == [
        ("approval.rejected.v1", "checker-2", "payee unknown")]


async def test_a_rejection_needs_a_reason(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=100_000)
    response = await http.post(f"/v1/approvals/{request.id}/decisions", json={"decision": "reject"},
                               headers=as_("checker"))
    assert response.status_code == 422 and response.json()["code"] == "validation_error"


async def test_another_tenants_request_is_not_found(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=100_000)
    stranger = as_("checker", tenant_id="another-tenant")

    assert (await http.get(f"/v1/approvals/{request.id}", headers=stranger)).status_code == 404
    refused = await decide(http, request.id, stranger)
    assert refused.status_code == 404 and refused.json()["code"] == "approval_not_found"
    malformed = await http.get("/v1/approvals/not-a-uuid", headers=as_("checker"))
    assert malformed.status_code == 404 and malformed.json()["code"] == "approval_not_found"
    listed = await http.get("/v1/approvals", headers=stranger)
    assert request.id not in {item["id"] for item in listed.json()["data"]}
    assert await scalar(sessionmaker, "SELECT count(*) FROM approval_decisions WHERE request_id = :id",
                        id=request.id) == 0


async def test_scopes_are_required(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=100_000)

    cannot_decide = await decide(http, request.id, as_("checker", scopes=["approvals:read"]))
    cannot_read = await http.get("/v1/approvals", headers=as_("checker", scopes=["approvals:decide"]))
    anonymous = await http.get("/v1/approvals")

    assert cannot_decide.status_code == cannot_read.status_code == 403
    assert cannot_decide.json()["code"] == "insufficient_scope"
    assert anonymous.status_code == 401


async def test_an_idempotent_retry_of_a_decision_replays_it(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=1_000_000)
    headers = as_("checker", **{"Idempotency-Key": f"decide-{uuid.uuid4()}"})

    first = await decide(http, request.id, headers)
    retry = await decide(http, request.id, headers)

    assert first.status_code == retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true" and retry.json() == first.json()
    assert await scalar(sessionmaker, "SELECT count(*) FROM approval_decisions WHERE request_id = :id",
                        id=request.id) == 1


async def test_rules_can_restrict_who_approves(http, as_, settings, tenant):
    policy = {"reason": "treasury approves payees", "rules": [
        {"name": "treasury_only", "required_approvals": 1, "approver_scopes": ["approvals:treasury"],
         "approver_principals": ["tina", "tom"]}]}
    assert (await http.put("/v1/approvals/policies/payee", json=policy, headers=as_("admin"))).status_code == 200
    created = (await http.post("/v1/approvals", json={"subject_type": "payee", "subject_id": "p-9"},
                               headers=as_("filer"))).json()

    outsider = await decide(http, created["id"], as_("olga", scopes=["approvals:decide", "approvals:treasury"]))
    no_scope = await decide(http, created["id"], as_("tina", scopes=["approvals:decide"]))
    allowed = await decide(http, created["id"], as_("tom", scopes=["approvals:decide", "approvals:treasury"]))

    assert outsider.status_code == no_scope.status_code == 403
    assert outsider.json()["code"] == no_scope.json()["code"] == "not_an_eligible_approver"
    assert allowed.status_code == 201 and allowed.json()["approval"]["status"] == "granted"
