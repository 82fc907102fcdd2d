"""Many writers on one hot account through the API, concurrently: every request answers
(no deadlock or serialization failure reaches a client), and the result is exact to the
minor unit, entry by entry."""

from __future__ import annotations

import asyncio
import random

from services.ledger.verify import verify

WRITERS = 60
ROUNDS = 5


async def test_sixty_concurrent_writers_on_one_account_give_exact_balances(api, ledger_db):
    hot = await api.account()
    await api.fund(hot, 1_000_000)
    sinks = [await api.account() for _ in range(WRITERS)]
    funding = await api.system_account("funding")
    rng = random.Random(7)
    plan = [[rng.choice(("out", "in", "hold")) for _ in range(ROUNDS)] for _ in range(WRITERS)]

    async def writer(number: int) -> list[int]:
        statuses = []
        for step, action in enumerate(plan[number]):
            amount = 1 + number + step
            if action == "out":
                response = await api.transfer(hot["id"], sinks[number]["id"], amount)
            elif action == "in":
                response = await api.transfer(funding["id"], hot["id"], amount)
            else:
                placed = await api.hold(hot["id"], sinks[number]["id"], amount)
                statuses.append(placed.status_code)
                response = await api.post(f"/v1/ledger/holds/{placed.json()['id']}/post")
            statuses.append(response.status_code)
        return statuses

    results = await asyncio.gather(*(writer(n) for n in range(WRITERS)))
    assert {status for statuses in results for status in statuses} <= {200, 201}, results

    out = sum(1 + n + s for n in range(WRITERS) for s, a in enumerate(plan[n]) if a in ("out", "hold"))
    into = sum(1 + n + s for n in range(WRITERS) for s, a in enumerate(plan[n]) if a == "in")
    balance = await api.balance(hot["id"])
    assert (balance["posted"], balance["pending"], balance["available"]) == (1_000_000 - out + into,) * 3
    holds = sum(1 for n in range(WRITERS) for a in plan[n] if a == "hold")
    assert balance["version"] == 1 + (WRITERS * ROUNDS - holds) + 3 * holds  # a hold: pend, release, post
    for number, sink in enumerate(sinks):
        expected = sum(1 + number + s for s, a in enumerate(plan[number]) if a in ("out", "hold"))
        assert (await api.balance(sink["id"]))["posted"] == expected
    assert await verify(ledger_db.app_url) == []


async def test_writers_locking_accounts_in_opposite_orders_never_deadlock(api, ledger_db):
    left, right = await api.account(), await api.account()
    await api.fund(left, 100_000)
    await api.fund(right, 100_000)

    async def swap(number: int):
        # Entries list the accounts in opposite orders; the service always locks by id.
        first, second = (left, right) if number % 2 else (right, left)
        return await api.post("/v1/ledger/transactions", {"entries": [
            {"account_id": second["id"], "direction": "credit", "amount": 3},
            {"account_id": first["id"], "direction": "debit", "amount": 3}]})

    answers = await asyncio.gather(*(swap(n) for n in range(80)))
    assert [a.status_code for a in answers] == [201] * 80
    assert (await api.balance(left["id"]))["posted"] == (await api.balance(right["id"]))["posted"] == 100_000
    assert await verify(ledger_db.app_url) == []


async def test_concurrent_spending_never_overdraws(api, ledger_db):
    wallet, shop = await api.account(), await api.account()
    await api.fund(wallet, 1_000)
    answers = await asyncio.gather(*(api.transfer(wallet["id"], shop["id"], 7) for _ in range(200)))
    codes = [a.status_code for a in answers]
    assert codes.count(201) == 1_000 // 7 and codes.count(422) == 200 - 1_000 // 7
    assert all(a.json()["code"] == "insufficient_funds" for a in answers if a.status_code == 422)
    assert (await api.balance(wallet["id"]))["posted"] == 1_000 % 7
    assert await verify(ledger_db.app_url) == []
