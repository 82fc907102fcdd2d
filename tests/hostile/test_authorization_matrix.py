"""The authorization matrix: every public operation of the gateway (read from its merged
OpenAPI document, its scope from the route table in gateway/routes.py) against every way a
caller can be wrong, as design section 5 says:

    missing key            401 missing_api_key
    wrong scope            403 insufficient_scope   (a key with every scope but the one needed)
    another tenant's object 404                     (a key of tenant B with every scope)
    revoked key            401 api_key_revoked

Operations on one object are asked about tenant A's object with B's key. Collections
and tenant settings have no object to name: B sees none of A's objects there, and what B
changes (its policy, its rules) leaves A's unchanged. Bodies that name A's objects
(accounts, a statement) are refused as unknown, and a payment B asks to send from A's
account never moves A's money.
"""

from __future__ import annotations

import json

import pytest

from gateway.keys import SCOPES
from gateway.routes import resolve
from tests.hostile.conftest import assert_problem
from tests.hostile.world import OBJECT_PARAMETERS, body_for, document, operations


@pytest.fixture(scope="module")
def public_operations(hostile):
    found = operations(document(hostile.gateway))
    assert len(found) >= 35, [op.label for op in found]
    return found


@pytest.fixture(scope="module")
async def keys(hostile, world):
    """Keys of tenant A's principal alice: one revoked, and per scope one holding every other."""
    tenant = world.tenant
    revoked = await hostile.key(tenant=tenant, principal="alice")
    await hostile.revoke(revoked)
    lacking = {scope: await hostile.key(tenant=tenant, principal="alice",
                                        scopes=[s for s in SCOPES if s != scope]) for scope in SCOPES}
    return {"revoked": revoked, "lacking": lacking, "other_tenant": await hostile.key(principal="bob")}


def test_every_operation_names_the_scope_the_route_table_gives_it(public_operations, world):
    for op in public_operations:
        route = resolve(op.method, world.path(op.template))
        assert route is not None and route.scope, op.label
        assert op.spec.get("x-clearhouse-scope") == route.scope, (op.label, op.spec.get("x-clearhouse-scope"))
        assert op.spec.get("security") == [{"ApiKey": []}], op.label


async def test_missing_wrong_scope_and_revoked_keys_are_refused_on_every_operation(
        hostile, world, keys, public_operations):
    failures = []
    for op in public_operations:
        path, body = world.path(op.template), body_for(op, world.ids)
        scope = resolve(op.method, path).scope
        for column, key, status, code in (
                ("missing key", None, 401, "missing_api_key"),
                ("wrong scope", keys["lacking"][scope], 403, "insufficient_scope"),
                ("revoked key", keys["revoked"], 401, "api_key_revoked")):
            api = hostile.api(key)
            response = await api.request(op.method, path, json=body)
            await api.close()
            if response.status_code != status or response.json().get("code") != code:
                failures.append(f"{op.label} [{column}]: {response.status_code} {response.text[:200]}")
            elif column == "wrong scope":
                assert response.json()["missing_scope"] == scope, response.text
    assert not failures, "\n".join(failures)


async def test_another_tenants_objects_are_404_on_every_operation_that_names_one(
        hostile, world, keys, public_operations):
    other, owner = hostile.api(keys["other_tenant"]), hostile.api(world.key)
    failures, checked = [], 0
    for op in public_operations:
        if not op.parameters & OBJECT_PARAMETERS:
            continue
        checked += 1
        if op.method == "GET":  # the control: the object is there for its own tenant
            mine = await owner.get(world.path(op.template))
            assert mine.status_code in (200, 206), (op.label, mine.text)
        response = await other.request(op.method, world.path(op.template), json=body_for(op, world.ids))
        if response.status_code != 404 or not response.headers["content-type"].startswith("application/problem"):
            failures.append(f"{op.label}: {response.status_code} {response.text[:200]}")
    await other.close()
    await owner.close()
    assert checked >= 20 and not failures, "\n".join(failures)


async def test_collections_and_settings_show_another_tenant_nothing_of_a(hostile, world, keys, public_operations):
    other, owner = hostile.api(keys["other_tenant"]), hostile.api(world.key)
    a_ids = {v for k, v in world.ids.items() if k not in ("subject_type", "processor")}
    policy_before = (await owner.get("/v1/approvals/policies/payment")).json()
    rules_before = (await owner.get("/v1/reconciliation/rules")).json()
    for op in public_operations:
        if op.parameters & OBJECT_PARAMETERS or op.method != "GET":
            continue
        # A's own listing of its objects of every kind (a refund's transaction too) is a 200 ...
        mine = await owner.get(world.path(op.template))
        assert mine.status_code == 200, (op.label, mine.text)
        # ... and B's shows none of them.
        response = await other.get(world.path(op.template))
        assert response.status_code == 200, (op.label, response.text)
        leaked = [i for i in a_ids if i in response.text]
        assert not leaked, (op.label, leaked)
    # B's own settings: changing them changes nothing of A's.
    changed = await other.request("PUT", "/v1/approvals/policies/payment", json={
        "rules": [{"name": "everything_by_two", "required_approvals": 2}], "reason": "tenant B's own"})
    assert changed.status_code == 200, changed.text
    assert (await other.request("PUT", "/v1/reconciliation/rules", json={"date_window_days": 9})).status_code == 200
    assert (await owner.get("/v1/approvals/policies/payment")).json() == policy_before
    assert (await owner.get("/v1/reconciliation/rules")).json() == rules_before
    await other.close()
    await owner.close()


async def test_bodies_naming_another_tenants_objects_reach_nothing(hostile, world):
    # A tenant of its own: the test above changed tenant B's approval policy.
    other, owner = hostile.api(await hostile.key(principal="mallory")), hostile.api(world.key)
    ids = world.ids
    for path, body in (
            ("/v1/ledger/transactions", {"entries": [
                {"account_id": ids["account_id"], "direction": "debit", "amount": 100},
                {"account_id": ids["funding_id"], "direction": "credit", "amount": 100}]}),
            ("/v1/ledger/holds", {"debit_account_id": ids["account_id"], "credit_account_id": ids["funding_id"],
                                  "amount": 100}),
            ("/v1/reconciliation/runs", {"statement_id": ids["statement_id"]})):
        assert_problem(await other.post(path, body), 404)
    balance = (await owner.get(f"/v1/ledger/accounts/{ids['account_id']}/balance")).json()
    # A payment from A's account, asked for by B: created in B's tenant, it can never be reserved.
    stolen = await other.pay(ids["account_id"], 1_000, reference="not mine")
    failed = await other.until_status(stolen["id"], "failed", "settled")
    assert failed["status"] == "failed", failed
    after = (await owner.get(f"/v1/ledger/accounts/{ids['account_id']}/balance")).json()
    assert (after["posted"], after["available"]) == (balance["posted"], balance["available"]), (balance, after)
    assert stolen["id"] not in json.dumps((await owner.get("/v1/payments", limit=100)).json())
    await other.close()
    await owner.close()
