"""Two-phase transfers through the API: a hold reserves money (available drops, posted
does not), then posts fully or partly, or is voided, exactly once; an expired hold
voids itself."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

from services.ledger.consumers import HoldExpiry
from services.ledger.tests.integration.conftest import scalar


async def test_a_hold_reserves_then_posts_in_full(api):
    alice, shop = await api.account(), await api.account()
    await api.fund(alice, 1_000)
    placed = await api.hold(alice["id"], shop["id"], 300, description="card auth")
    assert placed.status_code == 201, placed.text
    hold = placed.json()
    assert hold["status"] == "pending" and hold["amount"] == 300 and hold["currency"] == "EUR"
    assert placed.headers["location"] == f"/v1/ledger/holds/{hold['id']}"
    a, s = await api.balance(alice["id"]), await api.balance(shop["id"])
    assert (a["posted"], a["pending"], a["available"]) == (1_000, 700, 700)
    assert (s["posted"], s["pending"], s["available"]) == (0, 300, 0)  # pending inflow is not spendable
    posted = await api.post(f"/v1/ledger/holds/{hold['id']}/post")
    assert posted.status_code == 200, posted.text
    assert posted.json()["status"] == "posted" and posted.json()["amount_posted"] == 300
    a, s = await api.balance(alice["id"]), await api.balance(shop["id"])
    assert (a["posted"], a["pending"], a["available"]) == (700, 700, 700)
    assert (s["posted"], s["pending"], s["available"]) == (300, 300, 300)
    transaction = (await api.get(f"/v1/ledger/transactions/{posted.json()['resolved_transaction_id']}")).json()
    assert transaction["kind"] == "hold_posted" and transaction["hold_id"] == hold["id"]
    assert sorted((e["kind"], e["direction"], e["amount"]) for e in transaction["entries"]) == [
        ("posted", "credit", 300), ("posted", "debit", 300), ("released", "credit", 300), ("released", "debit", 300)]


async def test_a_partial_post_releases_the_rest(api):
    alice, shop = await api.account(), await api.account()
    await api.fund(alice, 1_000)
    hold = (await api.hold(alice["id"], shop["id"], 400)).json()
    too_much = await api.post(f"/v1/ledger/holds/{hold['id']}/post", {"amount": 401})
    assert too_much.status_code == 422 and too_much.json()["code"] == "amount_exceeds_hold"
    posted = await api.post(f"/v1/ledger/holds/{hold['id']}/post", {"amount": 150})
    assert posted.status_code == 200 and posted.json()["amount_posted"] == 150
    a = await api.balance(alice["id"])
    assert (a["posted"], a["pending"], a["available"]) == (850, 850, 850)
    assert (await api.balance(shop["id"]))["posted"] == 150


async def test_a_hold_is_resolved_exactly_once(api):
    alice, shop = await api.account(), await api.account()
    await api.fund(alice, 1_000)
    hold = (await api.hold(alice["id"], shop["id"], 100)).json()
    voided = await api.post(f"/v1/ledger/holds/{hold['id']}/void", {"reason": "customer changed mind"})
    assert voided.status_code == 200 and voided.json()["status"] == "voided"
    assert voided.json()["void_reason"] == "customer changed mind"
    assert (await api.balance(alice["id"]))["available"] == 1_000
    for action in ("post", "void"):
        again = await api.post(f"/v1/ledger/holds/{hold['id']}/{action}")
        assert again.status_code == 409 and again.json()["code"] == "hold_not_pending"
    fetched = await api.get(f"/v1/ledger/holds/{hold['id']}")
    assert fetched.json() == voided.json()


async def test_concurrent_post_and_void_of_one_hold_resolve_it_once(api, sessionmaker):
    alice, shop = await api.account(), await api.account()
    await api.fund(alice, 1_000)
    hold = (await api.hold(alice["id"], shop["id"], 100)).json()
    answers = await asyncio.gather(*(api.post(f"/v1/ledger/holds/{hold['id']}/{action}")
                                     for action in ("post", "void") * 5))
    assert sorted(a.status_code for a in answers) == [200] + [409] * 9
    assert await scalar(sessionmaker, "SELECT count(*) FROM transactions WHERE hold_id = :h",
                        h=uuid.UUID(hold["id"])) == 2  # placed + one resolution
    a = await api.balance(alice["id"])
    assert a["pending"] == a["posted"] and a["posted"] in (900, 1_000)


async def test_a_hold_beyond_the_available_balance_is_refused(api):
    alice, shop = await api.account(), await api.account()
    await api.fund(alice, 500)
    assert (await api.hold(alice["id"], shop["id"], 400)).status_code == 201
    response = await api.hold(alice["id"], shop["id"], 101)
    assert response.status_code == 422 and response.json()["code"] == "insufficient_funds"
    transfer = await api.transfer(alice["id"], shop["id"], 101)  # held money cannot be spent twice
    assert transfer.status_code == 422 and transfer.json()["code"] == "insufficient_funds"
    assert (await api.transfer(alice["id"], shop["id"], 100)).status_code == 201


async def test_hold_requests_are_checked(api):
    alice, shop, dollars = await api.account(), await api.account(), await api.account(currency="USD")
    await api.fund(alice, 500)
    same = await api.hold(alice["id"], alice["id"], 1)
    assert same.status_code == 422 and same.json()["code"] == "same_account"
    crossed = await api.hold(alice["id"], dollars["id"], 1)
    assert crossed.status_code == 422 and crossed.json()["code"] == "currency_mismatch"
    asserted = await api.hold(alice["id"], shop["id"], 1, currency="USD")
    assert asserted.status_code == 422 and asserted.json()["code"] == "currency_mismatch"
    past = await api.hold(alice["id"], shop["id"], 1, expires_at="2001-01-01T00:00:00Z")
    assert past.status_code == 422 and past.json()["code"] == "invalid_expiry"
    unknown = await api.hold(alice["id"], str(uuid.uuid4()), 1)
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["pointer"] == "/body/credit_account_id"
    missing = await api.post(f"/v1/ledger/holds/{uuid.uuid4()}/post")
    assert missing.status_code == 404 and missing.json()["code"] == "hold_not_found"
    other = await api.for_tenant("elsewhere").get(f"/v1/ledger/holds/{uuid.uuid4()}")
    assert other.status_code == 404


async def test_an_expired_hold_voids_itself_and_cannot_be_posted(api, ledger_app):
    alice, shop = await api.account(), await api.account()
    await api.fund(alice, 1_000)
    expires_at = (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat()
    hold = (await api.hold(alice["id"], shop["id"], 600, expires_at=expires_at)).json()
    assert (await api.balance(alice["id"]))["available"] == 400
    await asyncio.sleep(1.2)
    too_late = await api.post(f"/v1/ledger/holds/{hold['id']}/post")
    assert too_late.status_code == 409 and too_late.json()["code"] == "hold_expired"
    expiry = HoldExpiry(sessionmaker=ledger_app.state.sessionmaker, batch_size=50)
    assert await expiry.run_once() >= 1
    fetched = (await api.get(f"/v1/ledger/holds/{hold['id']}")).json()
    assert fetched["status"] == "expired" and fetched["void_reason"] == "expired"
    assert (await api.balance(alice["id"]))["available"] == 1_000
    assert await expiry.run_once() == 0  # nothing is voided twice


async def test_list_holds_filters_by_status_and_account(api):
    alice, shop = await api.account(), await api.account()
    await api.fund(alice, 1_000)
    first = (await api.hold(alice["id"], shop["id"], 1)).json()
    second = (await api.hold(alice["id"], shop["id"], 2)).json()
    await api.post(f"/v1/ledger/holds/{second['id']}/void")
    pending = (await api.get("/v1/ledger/holds", {"status": "pending", "account_id": alice["id"]})).json()
    assert [h["id"] for h in pending["data"]] == [first["id"]]
    page = (await api.get("/v1/ledger/holds", {"limit": 1})).json()
    assert len(page["data"]) == 1 and page["next_cursor"]
    rest = (await api.get("/v1/ledger/holds", {"limit": 1, "cursor": page["next_cursor"]})).json()
    assert [h["id"] for h in page["data"] + rest["data"]] == [first["id"], second["id"]]
