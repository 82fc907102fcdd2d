"""Accounts and transactions through the ledger API against real PostgreSQL: double
entry per currency, funds checks, idempotency, external ids, reversals, bulk posting."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from services.ledger.tests.integration.conftest import scalar


async def test_an_account_is_opened_with_the_tenants_system_accounts(api):
    account = await api.account(currency="EUR", normal_balance="credit")
    assert account["currency"] == "EUR" and account["normal_balance"] == "credit"
    assert account["allow_negative"] is False and account["kind"] == "customer"
    fetched = await api.get(f"/v1/ledger/accounts/{account['id']}")
    assert fetched.status_code == 200 and fetched.json() == account
    listed = (await api.get("/v1/ledger/accounts", {"currency": "EUR"})).json()["data"]
    codes = sorted(a["system_code"] or "customer" for a in listed)
    assert codes == ["customer", "funding", "payouts_in_transit"]


async def test_another_tenants_account_is_not_found(api):
    account = await api.account()
    other = api.for_tenant("someone-else")
    for path in (f"/v1/ledger/accounts/{account['id']}", f"/v1/ledger/accounts/{account['id']}/balance",
                 f"/v1/ledger/accounts/{account['id']}/entries"):
        response = await other.get(path)
        assert response.status_code == 404 and response.json()["code"] == "account_not_found"
    funding = await other.account()
    response = await other.transfer(funding["id"], account["id"], 5)
    assert response.status_code == 404 and response.json()["code"] == "account_not_found"
    assert response.json()["errors"][0]["pointer"] == "/body/entries/1/account_id"


async def test_a_balanced_transaction_moves_both_balances(api):
    alice, bob = await api.account(), await api.account()
    await api.fund(alice, 10_000)
    response = await api.transfer(alice["id"], bob["id"], 2_500, description="rent", external_id="rent-1")
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) >= {"id", "entries", "posted_at"}
    assert [(e["account_id"], e["direction"], e["amount"]) for e in body["entries"]] == [
        (alice["id"], "debit", 2_500), (bob["id"], "credit", 2_500)]
    assert response.headers["location"] == f"/v1/ledger/transactions/{body['id']}"
    a, b = await api.balance(alice["id"]), await api.balance(bob["id"])
    assert (a["posted"], a["pending"], a["available"]) == (7_500, 7_500, 7_500)
    assert (b["posted"], b["pending"], b["available"]) == (2_500, 2_500, 2_500)
    assert a["account_id"] == alice["id"] and a["currency"] == "EUR" and "as_of" in a
    fetched = await api.get(f"/v1/ledger/transactions/{body['id']}")
    assert fetched.json() == body


async def test_an_unbalanced_transaction_is_refused_and_writes_nothing(api, sessionmaker):
    alice, bob = await api.account(allow_negative=True), await api.account()
    response = await api.post("/v1/ledger/transactions", {"entries": [
        {"account_id": alice["id"], "direction": "debit", "amount": 100},
        {"account_id": bob["id"], "direction": "credit", "amount": 99}]})
    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "unbalanced_transaction"
    assert "EUR" in problem["detail"] and problem["imbalances"] == [
        {"currency": "EUR", "layer": "posted", "debits": 100, "credits": 99}]
    assert response.headers["content-type"] == "application/problem+json"
    assert await scalar(sessionmaker, "SELECT count(*) FROM entries WHERE account_id = :a",
                        a=uuid.UUID(alice["id"])) == 0


async def test_each_currency_balances_on_its_own(api):
    eur_a, eur_b = await api.account(currency="EUR", allow_negative=True), await api.account(currency="EUR")
    usd_a, usd_b = await api.account(currency="USD", allow_negative=True), await api.account(currency="USD")
    legs = [(eur_a, "debit", 100), (eur_b, "credit", 100), (usd_a, "debit", 7), (usd_b, "credit", 7)]
    entries = [{"account_id": a["id"], "direction": d, "amount": n} for a, d, n in legs]
    assert (await api.post("/v1/ledger/transactions", {"entries": entries})).status_code == 201
    # Equal totals across currencies are not a balance: 100 EUR against 100 USD.
    crossed = [{"account_id": eur_a["id"], "direction": "debit", "amount": 100},
               {"account_id": usd_b["id"], "direction": "credit", "amount": 100}]
    response = await api.post("/v1/ledger/transactions", {"entries": crossed})
    assert response.status_code == 422 and response.json()["code"] == "unbalanced_transaction"


async def test_a_non_negative_account_cannot_go_below_zero(api):
    alice, bob = await api.account(), await api.account()
    await api.fund(alice, 1_000)
    response = await api.transfer(alice["id"], bob["id"], 1_001)
    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "insufficient_funds" and problem["account_id"] == alice["id"]
    assert problem["available"] == 1_000 and problem["required"] == 1_001
    assert (await api.transfer(alice["id"], bob["id"], 1_000)).status_code == 201
    assert (await api.balance(alice["id"]))["available"] == 0


async def test_an_account_allowed_negative_and_a_debit_normal_account(api):
    overdraft, bob = await api.account(allow_negative=True), await api.account()
    asset = await api.account(normal_balance="debit")
    assert (await api.transfer(overdraft["id"], bob["id"], 300)).status_code == 201
    assert (await api.balance(overdraft["id"]))["posted"] == -300
    # Debiting a debit-normal account raises it; crediting it lowers it, never below zero.
    assert (await api.transfer(asset["id"], overdraft["id"], 300)).status_code == 201
    assert (await api.balance(asset["id"]))["posted"] == 300
    assert (await api.balance(overdraft["id"]))["posted"] == 0
    response = await api.transfer(overdraft["id"], asset["id"], 301)
    assert response.status_code == 422 and response.json()["code"] == "insufficient_funds"
    assert response.json()["account_id"] == asset["id"]
    response = await api.post("/v1/ledger/transactions", {"entries": [
        {"account_id": overdraft["id"], "direction": "debit", "amount": 300},
        {"account_id": asset["id"], "direction": "credit", "amount": 0}]})
    assert response.status_code == 422 and response.json()["errors"][0]["pointer"] == "/body/entries/1/amount"


async def test_external_id_is_unique_per_tenant(api):
    alice, bob = await api.account(allow_negative=True), await api.account()
    first = await api.transfer(alice["id"], bob["id"], 10, external_id="inv-42")
    again = await api.transfer(alice["id"], bob["id"], 10, external_id="inv-42")
    assert first.status_code == 201 and again.status_code == 409
    assert again.json()["code"] == "external_id_conflict" and again.json()["transaction_id"] == first.json()["id"]
    other = api.for_tenant(f"other-{uuid.uuid4().hex[:6]}")
    x, y = await other.account(allow_negative=True), await other.account()
    assert (await other.transfer(x["id"], y["id"], 10, external_id="inv-42")).status_code == 201
    found = await api.get("/v1/ledger/transactions", {"external_id": "inv-42"})
    assert [t["id"] for t in found.json()["data"]] == [first.json()["id"]]


async def test_an_idempotency_key_replays_the_first_answer(api, sessionmaker):
    alice, bob = await api.account(allow_negative=True), await api.account()
    body = {"entries": [{"account_id": alice["id"], "direction": "debit", "amount": 5},
                        {"account_id": bob["id"], "direction": "credit", "amount": 5}]}
    first = await api.post("/v1/ledger/transactions", body, key="k-1")
    second = await api.post("/v1/ledger/transactions", body, key="k-1")
    assert first.status_code == second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true" and second.json() == first.json()
    assert (await api.balance(bob["id"]))["posted"] == 5
    reused = await api.post("/v1/ledger/transactions", {**body, "description": "other"}, key="k-1")
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"
    # A refusal is remembered too: a retry gets the same answer even once it could pass.
    overdraw = {"entries": [{"account_id": bob["id"], "direction": "debit", "amount": 50},
                            {"account_id": alice["id"], "direction": "credit", "amount": 50}]}
    refused = await api.post("/v1/ledger/transactions", overdraw, key="k-2")
    assert refused.status_code == 422 and refused.json()["code"] == "insufficient_funds"
    assert (await api.transfer(alice["id"], bob["id"], 100)).status_code == 201
    retried = await api.post("/v1/ledger/transactions", overdraw, key="k-2")
    assert retried.status_code == 422 and retried.headers["idempotent-replayed"] == "true"


async def test_a_reversal_mirrors_the_original_once(api):
    alice, bob = await api.account(), await api.account()
    await api.fund(alice, 1_000)
    original = (await api.transfer(alice["id"], bob["id"], 400)).json()
    reversal = await api.post(f"/v1/ledger/transactions/{original['id']}/reverse", {"description": "typo"})
    assert reversal.status_code == 201, reversal.text
    body = reversal.json()
    assert body["kind"] == "reversal" and body["reverses_id"] == original["id"] and body["description"] == "typo"
    assert [(e["account_id"], e["direction"], e["amount"]) for e in body["entries"]] == [
        (alice["id"], "credit", 400), (bob["id"], "debit", 400)]
    assert (await api.balance(alice["id"]))["posted"] == 1_000 and (await api.balance(bob["id"]))["posted"] == 0
    again = await api.post(f"/v1/ledger/transactions/{original['id']}/reverse")
    assert again.status_code == 409 and again.json()["code"] == "transaction_already_reversed"
    assert again.json()["reversal_id"] == body["id"]
    # The original is untouched: a correction is a new transaction.
    assert (await api.get(f"/v1/ledger/transactions/{original['id']}")).json() == original


async def test_a_reversal_that_would_overdraw_is_refused(api):
    alice, bob, carol = await api.account(), await api.account(), await api.account()
    await api.fund(alice, 100)
    original = (await api.transfer(alice["id"], bob["id"], 100)).json()
    assert (await api.transfer(bob["id"], carol["id"], 60)).status_code == 201
    response = await api.post(f"/v1/ledger/transactions/{original['id']}/reverse")
    assert response.status_code == 422 and response.json()["code"] == "insufficient_funds"
    missing = await api.post(f"/v1/ledger/transactions/{uuid.uuid4()}/reverse")
    assert missing.status_code == 404 and missing.json()["code"] == "transaction_not_found"


async def test_bulk_posting_is_all_or_nothing_by_default(api):
    alice, bob = await api.account(), await api.account()
    await api.fund(alice, 1_000)

    def item(amount: int) -> dict:
        return {"entries": [{"account_id": alice["id"], "direction": "debit", "amount": amount},
                            {"account_id": bob["id"], "direction": "credit", "amount": amount}]}

    ok = await api.post("/v1/ledger/transactions/bulk", {"transactions": [item(100) for _ in range(5)]})
    assert ok.status_code == 201, ok.text
    assert ok.json()["posted"] == 5 and [d["index"] for d in ok.json()["data"]] == list(range(5))
    refused = await api.post("/v1/ledger/transactions/bulk", {"transactions": [item(100), item(450), item(100)]})
    assert refused.status_code == 422 and refused.json()["code"] == "insufficient_funds"
    assert refused.json()["index"] == 1 and refused.json()["detail"].startswith("Transaction 1:")
    assert (await api.balance(bob["id"]))["posted"] == 500  # nothing of the refused request
    partial = await api.post("/v1/ledger/transactions/bulk",
                             {"transactions": [item(100), item(450), item(300)], "atomic": False})
    assert partial.status_code == 200, partial.text
    result = partial.json()
    assert [d["status"] for d in result["data"]] == ["posted", "refused", "posted"]
    assert result["data"][1]["problem"]["code"] == "insufficient_funds"
    assert (result["posted"], result["refused"]) == (2, 1)
    assert (await api.balance(alice["id"]))["posted"] == 100


async def test_bulk_refuses_an_external_id_used_twice(api):
    alice, bob = await api.account(allow_negative=True), await api.account()
    item = {"entries": [{"account_id": alice["id"], "direction": "debit", "amount": 1},
                        {"account_id": bob["id"], "direction": "credit", "amount": 1}], "external_id": "dup"}
    response = await api.post("/v1/ledger/transactions/bulk", {"transactions": [item, item]})
    assert response.status_code == 422 and response.json()["code"] == "duplicate_external_id"
    assert response.json()["index"] == 1
    ghost = {"entries": [{"account_id": alice["id"], "direction": "debit", "amount": 1},
                         {"account_id": str(uuid.uuid4()), "direction": "credit", "amount": 1}]}
    response = await api.post("/v1/ledger/transactions/bulk", {"transactions": [ghost]})
    assert response.status_code == 404 and response.json()["index"] == 0
    assert response.json()["errors"][0]["pointer"] == "/body/transactions/0/entries/1/account_id"
    response = await api.post("/v1/ledger/transactions/bulk", {"transactions": [dict(item, external_id="x"), ghost]})
    assert response.json()["errors"][0]["pointer"] == "/body/transactions/1/entries/1/account_id"


async def test_posting_events_are_stamped_like_every_other_event(api, sessionmaker):
    """Postings write their event rows in the journal's own statement; the kit's path
    writes the others. Both must stamp the same columns from the same context."""
    headers = {"x-correlation-id": "corr-stamps"}
    opened = await api.http.post("/v1/ledger/accounts",
                                 json={"name": "x", "currency": "EUR", "normal_balance": "credit",
                                       "allow_negative": True},
                                 headers={**api.headers(), **headers})
    other = await api.account()
    posted = await api.http.post("/v1/ledger/transactions", json={"entries": [
        {"account_id": opened.json()["id"], "direction": "debit", "amount": 3},
        {"account_id": other["id"], "direction": "credit", "amount": 3}]}, headers={**api.headers(), **headers})
    assert posted.status_code == 201
    async with sessionmaker() as session:
        rows = {r.type: r for r in (await session.execute(text(
            "SELECT * FROM events WHERE aggregate_id IN (:a, :t)"),
            {"a": opened.json()["id"], "t": posted.json()["id"]})).mappings()}
    kit, fast = rows["ledger.account.opened.v1"], rows["ledger.transaction.posted.v1"]
    assert set(kit.keys()) == set(fast.keys())
    for column in ("tenant_id", "actor", "correlation_id", "causation_id", "reason", "schema_version",
                   "published_at"):
        assert kit[column] == fast[column], column
    assert (fast["tenant_id"], fast["actor"], fast["correlation_id"]) == (api.tenant, "user:alice", "corr-stamps")
    assert (kit["traceparent"] is None) == (fast["traceparent"] is None)
    assert fast["payload"]["transaction_id"] == posted.json()["id"] and fast["aggregate_type"] == "transaction"
