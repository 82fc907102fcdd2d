"""Policies over the API: the design's default, versioned changes that leave open requests
alone, audit, optimistic concurrency, conditions on currency, metadata and maker."""

from __future__ import annotations

import asyncio

from services.approvals.tests.integration.conftest import events_of, open_payment, rows, scalar
from services.approvals.verify import verify

NEEDS_TWO = {"reason": "dual control for everything from 1,000", "rules": [
    {"name": "two_from_1000", "required_approvals": 2,
     "conditions": {"amount_at_least": {"whole_major_units": 1000}}},
    {"name": "auto_otherwise", "required_approvals": 0}]}


async def test_the_default_policy_is_the_designs(http, as_):
    response = await http.get("/v1/approvals/policies/payment", headers=as_("auditor"))

    assert response.status_code == 200
    policy = response.json()
    assert (policy["version"], policy["is_default"]) == (0, True)
    assert [(r["name"], r["required_approvals"]) for r in policy["rules"]] == [
        ("two_approvers_from_10000", 2), ("one_approver_from_1000", 1), ("auto_below_1000", 0),
        ("one_approver_without_amount", 1)]


async def test_thresholds_follow_each_currencys_exponent(sessionmaker, settings, tenant):
    cases = [(99_999, "EUR", 0), (100_000, "EUR", 1), (999, "JPY", 0), (1_000, "JPY", 1), (10_000, "JPY", 2),
             (999_999, "KWD", 0), (1_000_000, "KWD", 1), (10_000_000, "KWD", 2)]
    for amount, currency, required in cases:
        request = await open_payment(sessionmaker, settings, tenant, amount=amount, currency=currency)
        assert request.required_approvals == required, (amount, currency)


async def test_a_new_version_applies_to_new_requests_only(http, as_, sessionmaker, settings, tenant):
    before = await open_payment(sessionmaker, settings, tenant, amount=500_000)  # 5,000.00: one approver under v0
    changed = await http.put("/v1/approvals/policies/payment", json=NEEDS_TWO, headers=as_("admin"))
    assert changed.status_code == 200, changed.text
    assert (changed.json()["version"], changed.json()["created_by"]) == (1, "admin")
    after = await open_payment(sessionmaker, settings, tenant, amount=500_000)

    assert (before.policy_version, before.required_approvals) == (0, 1)
    assert (after.policy_version, after.required_approvals, after.rule) == (1, 2, "two_from_1000")
    old = await http.post(f"/v1/approvals/{before.id}/decisions", json={"decision": "approve"}, headers=as_("ann"))
    new = await http.post(f"/v1/approvals/{after.id}/decisions", json={"decision": "approve"}, headers=as_("ann"))
    assert old.json()["approval"]["status"] == "granted"
    assert new.json()["approval"]["status"] == "pending"

    requested = (await events_of(sessionmaker, after.id))[0]
    assert (requested.payload["policy_id"], requested.payload["policy_version"]) == (changed.json()["id"], 1)
    [audit] = await rows(sessionmaker, "SELECT actor, reason, payload FROM events "
                                       "WHERE type = 'approval_policy.changed.v1' AND tenant_id = :t", t=tenant)
    assert audit.actor == "user:admin" and audit.reason == NEEDS_TWO["reason"]
    assert (audit.payload["previous_version"], audit.payload["version"]) == (0, 1)

    # The consumer's cache now remembers version 1; a change elsewhere is still seen at once.
    relaxed = {"reason": "back to auto", "rules": [{"name": "auto", "required_approvals": 0}]}
    assert (await http.put("/v1/approvals/policies/payment", json=relaxed, headers=as_("admin"))).status_code == 200
    latest = await open_payment(sessionmaker, settings, tenant, amount=500_000)
    assert (latest.policy_version, latest.status) == (2, "granted")

    current = (await http.get("/v1/approvals/policies/payment", headers=as_("auditor"))).json()
    first = (await http.get("/v1/approvals/policies/payment?version=0", headers=as_("auditor"))).json()
    missing = await http.get("/v1/approvals/policies/payment?version=7", headers=as_("auditor"))
    assert current["version"] == 2 and first["is_default"] is True
    assert missing.status_code == 404 and missing.json()["code"] == "policy_version_not_found"


async def test_concurrent_changes_get_distinct_versions(http, as_, tenant):
    responses = await asyncio.gather(*(
        http.put("/v1/approvals/policies/payee", json={**NEEDS_TWO, "reason": f"change {i}"}, headers=as_("admin"))
        for i in range(5)))
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert sorted(r.json()["version"] for r in responses) == [1, 2, 3, 4, 5]


async def test_expected_version_guards_against_lost_updates(http, as_, tenant):
    first = await http.put("/v1/approvals/policies/payee", json={**NEEDS_TWO, "expected_version": 0},
                           headers=as_("admin"))
    stale = await http.put("/v1/approvals/policies/payee", json={**NEEDS_TWO, "expected_version": 0},
                           headers=as_("other-admin"))
    assert first.status_code == 200
    assert stale.status_code == 409 and stale.json()["code"] == "policy_version_conflict"
    assert stale.json()["current_version"] == 1


async def test_changing_a_policy_needs_the_admin_scope(http, as_):
    response = await http.put("/v1/approvals/policies/payee", json=NEEDS_TWO,
                              headers=as_("approver", scopes=["approvals:read", "approvals:decide"]))
    assert response.status_code == 403 and response.json()["code"] == "insufficient_scope"


async def test_a_policy_that_cannot_decide_everything_is_refused(http, as_):
    not_total = {"reason": "oops", "rules": [{"name": "big", "required_approvals": 1,
                                              "conditions": {"amount_at_least": {"minor_units": {"EUR": 100}}}}]}
    unreachable = {"reason": "oops", "rules": [{"name": "all", "required_approvals": 3,
                                                "approver_principals": ["ann", "bob"]}]}
    float_threshold = {"reason": "oops", "rules": [
        {"name": "big", "required_approvals": 1, "conditions": {"amount_at_least": {"minor_units": {"EUR": 10.5}}}},
        {"name": "rest", "required_approvals": 0}]}
    for body in (not_total, unreachable, float_threshold):
        response = await http.put("/v1/approvals/policies/payee", json=body, headers=as_("admin"))
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "validation_error" and response.json()["errors"]


async def test_conditions_on_currency_metadata_and_maker(http, as_, sessionmaker, settings, tenant):
    policy = {"reason": "payroll and interns", "rules": [
        {"name": "interns_always_two", "required_approvals": 2, "conditions": {"created_by": ["intern"]}},
        {"name": "payroll_auto", "required_approvals": 0,
         "conditions": {"metadata": {"category": "payroll"}, "currencies": ["EUR"]}},
        {"name": "chf_from_500", "required_approvals": 1,
         "conditions": {"amount_at_least": {"minor_units": {"CHF": 50_000}}}},
        {"name": "otherwise_auto", "required_approvals": 0}]}
    assert (await http.put("/v1/approvals/policies/payment", json=policy, headers=as_("admin"))).status_code == 200

    intern = await open_payment(sessionmaker, settings, tenant, amount=100, maker="intern")
    payroll = await open_payment(sessionmaker, settings, tenant, amount=9_000_000, metadata={"category": "payroll"})
    payroll_usd = await open_payment(sessionmaker, settings, tenant, amount=9_000_000, currency="USD",
                                     metadata={"category": "payroll"})
    chf = await open_payment(sessionmaker, settings, tenant, amount=50_000, currency="CHF")

    assert [(r.rule, r.status) for r in (intern, payroll, payroll_usd, chf)] == [
        ("interns_always_two", "pending"), ("payroll_auto", "granted"), ("otherwise_auto", "granted"),
        ("chf_from_500", "pending")]
    assert await scalar(sessionmaker, "SELECT count(*) FROM approval_policy_versions WHERE tenant_id = :t",
                        t=tenant) == 1


async def test_policy_versions_and_the_requests_opened_under_them_rebuild_from_the_log(database):
    # Runs last in this module: every policy change and request above must rebuild exactly.
    assert await verify(database.app_url) == []
