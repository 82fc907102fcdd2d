"""Balances now and at any past instant, and the entries behind them: every entry
carries the account's balance right after it, so `as_of` is one index probe."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta


def _later(instant: str, **delta) -> str:
    return (datetime.fromisoformat(instant) + timedelta(**delta)).isoformat()


async def test_balance_as_of_any_past_instant_including_pending(api):
    alice, shop = await api.account(), await api.account()
    created = await api.balance(alice["id"])
    t_funded = (await api.fund(alice, 1_000))["posted_at"]
    await asyncio.sleep(0.01)
    hold = (await api.hold(alice["id"], shop["id"], 300)).json()
    t_held = hold["created_at"]
    await asyncio.sleep(0.01)
    t_paid = (await api.transfer(alice["id"], shop["id"], 100)).json()["posted_at"]
    await asyncio.sleep(0.01)
    t_posted = (await api.post(f"/v1/ledger/holds/{hold['id']}/post", {"amount": 250})).json()["resolved_at"]

    def triple(balance: dict) -> tuple[int, int, int]:
        return balance["posted"], balance["pending"], balance["available"]

    assert triple(await api.balance(alice["id"], created["as_of"])) == (0, 0, 0)
    assert triple(await api.balance(alice["id"], _later(t_funded, microseconds=-1))) == (0, 0, 0)
    assert triple(await api.balance(alice["id"], t_funded)) == (1_000, 1_000, 1_000)
    assert triple(await api.balance(alice["id"], t_held)) == (1_000, 700, 700)
    assert triple(await api.balance(alice["id"], _later(t_paid, microseconds=-1))) == (1_000, 700, 700)
    assert triple(await api.balance(alice["id"], t_paid)) == (900, 600, 600)
    assert triple(await api.balance(alice["id"], t_posted)) == (650, 650, 650)
    assert triple(await api.balance(alice["id"], "2999-01-01T00:00:00Z")) == (650, 650, 650)
    assert triple(await api.balance(shop["id"], t_held)) == (0, 300, 0)
    past = await api.balance(alice["id"], t_held)
    assert datetime.fromisoformat(past["as_of"]) == datetime.fromisoformat(t_held)
    assert past["version"] == 2  # the funding entry and the hold's pending entry


async def test_as_of_accepts_rfc3339_only(api):
    alice = await api.account()
    for good in ("2020-01-01T00:00:00Z", "2020-01-01T01:00:00+01:00", "2020-01-01t00:00:00.123456789z",
                 "2020-01-01T01:00:00 01:00"):  # an unencoded '+' arrives as a space
        response = await api.get(f"/v1/ledger/accounts/{alice['id']}/balance", {"as_of": good})
        assert response.status_code == 200, (good, response.text)
    for bad in ("yesterday", "1700000000", "2020-01-01", "2020-01-01T00:00:00", "2020-02-30T00:00:00Z",
                "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "２０２０-01-01T00:00:00Z", "x" * 500):
        response = await api.get(f"/v1/ledger/accounts/{alice['id']}/balance", {"as_of": bad})
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["errors"][0]["pointer"] == "/query/as_of"


async def test_entries_carry_the_running_balance_and_page_with_a_cursor(api):
    alice, bob = await api.account(), await api.account()
    await api.fund(alice, 1_000)
    for amount in (100, 200, 300):
        assert (await api.transfer(alice["id"], bob["id"], amount)).status_code == 201
    first = (await api.get(f"/v1/ledger/accounts/{alice['id']}/entries", {"limit": 2})).json()
    assert [e["account_version"] for e in first["data"]] == [1, 2] and first["next_cursor"]
    second = (await api.get(f"/v1/ledger/accounts/{alice['id']}/entries",
                            {"limit": 2, "cursor": first["next_cursor"]})).json()
    assert [e["account_version"] for e in second["data"]] == [3, 4] and second["next_cursor"] is None
    entries = first["data"] + second["data"]
    assert [(e["direction"], e["amount"], e["balance_after"]["posted"]) for e in entries] == [
        ("credit", 1_000, 1_000), ("debit", 100, 900), ("debit", 200, 700), ("debit", 300, 400)]
    newest = (await api.get(f"/v1/ledger/accounts/{alice['id']}/entries", {"order": "desc", "limit": 3})).json()
    assert [e["account_version"] for e in newest["data"]] == [4, 3, 2]
    older = (await api.get(f"/v1/ledger/accounts/{alice['id']}/entries",
                           {"order": "desc", "cursor": newest["next_cursor"]})).json()
    assert [e["account_version"] for e in older["data"]] == [1]
    # A cursor is only valid for the list (and order) that gave it.
    for cursor in ("garbage", "!!!", first["next_cursor"] + "x", newest["next_cursor"]):
        response = await api.get(f"/v1/ledger/accounts/{alice['id']}/entries", {"cursor": cursor})
        assert response.status_code == 400 and response.json()["code"] == "invalid_cursor", cursor


async def test_list_accounts_pages_and_filters(api):
    opened = [await api.account(currency="CHF") for _ in range(3)]
    page = (await api.get("/v1/ledger/accounts", {"currency": "CHF", "kind": "customer", "limit": 2})).json()
    rest = (await api.get("/v1/ledger/accounts", {"currency": "CHF", "kind": "customer", "limit": 2,
                                                   "cursor": page["next_cursor"]})).json()
    assert [a["id"] for a in page["data"] + rest["data"]] == [a["id"] for a in opened]
    assert rest["next_cursor"] is None
    assert (await api.get("/v1/ledger/accounts", {"cursor": str(uuid.uuid4())})).status_code == 400
