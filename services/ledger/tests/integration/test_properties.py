"""Property: whatever sequence of transactions, holds, posts, voids, reversals and bulk
requests a tenant sends, (1) every transaction balances per currency and the tenant's
accounts sum to zero, and (2) the balance at any instant equals the sum of the entries
up to that instant — and both equal an independent model of what should have happened,
including which requests are refused.

The model below is written from the rules in ARCHITECTURE/ledger docs, not from the
service's code, so the two can disagree."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from services.ledger.verify import verify

# (normal balance, allow negative) of the accounts every example starts with.
ACCOUNTS = [("credit", False), ("credit", False), ("credit", True), ("debit", False)]
SOURCE = 0  # the tenant's funding account stands behind index -1 in operations
amounts = st.integers(min_value=1, max_value=400)
account = st.integers(min_value=-1, max_value=len(ACCOUNTS) - 1)

operations = st.lists(st.one_of(
    st.tuples(st.just("transfer"), account, account, amounts),
    st.tuples(st.just("split"), account, account, account, amounts, amounts),
    st.tuples(st.just("hold"), account, account, amounts),
    st.tuples(st.just("post"), st.integers(0, 9), st.one_of(st.none(), amounts)),
    st.tuples(st.just("void"), st.integers(0, 9)),
    st.tuples(st.just("reverse"), st.integers(0, 9)),
    st.tuples(st.just("bulk"), st.lists(st.tuples(account, account, amounts), min_size=1, max_size=4),
              st.booleans()),
), min_size=1, max_size=12)


@dataclass(frozen=True)
class Model:
    """Per account: posted debits, posted credits, pending debits, pending credits."""

    normal: str
    allow_negative: bool
    pd: int = 0
    pc: int = 0
    qd: int = 0
    qc: int = 0

    def posted(self) -> int:
        return self.pc - self.pd if self.normal == "credit" else self.pd - self.pc

    def available(self) -> int:
        return self.pc - self.pd - self.qd if self.normal == "credit" else self.pd - self.pc - self.qc

    def pending(self) -> int:
        credits, debits = self.pc + self.qc, self.pd + self.qd
        return credits - debits if self.normal == "credit" else debits - credits


@dataclass
class World:
    ids: list[str]
    books: dict[str, Model]
    history: list[tuple[str, dict[str, Model]]] = field(default_factory=list)  # (posted_at, state after)
    transactions: list[dict] = field(default_factory=list)  # posted-money transactions, reversible
    reversed: set[str] = field(default_factory=set)
    holds: list[dict] = field(default_factory=list)

    def apply(self, moves: list[tuple[str, str, int, str]]) -> dict[str, Model] | None:
        """moves: (account, direction, amount, layer) → the new books, or None if refused."""
        books = dict(self.books)
        for account_id, direction, amount, layer in moves:
            m = books[account_id]
            if layer == "posted":
                m = replace(m, pd=m.pd + amount) if direction == "debit" else replace(m, pc=m.pc + amount)
            else:
                sign = 1 if layer == "pending" else -1
                m = replace(m, qd=m.qd + sign * amount) if direction == "debit" else replace(m, qc=m.qc + sign * amount)
            books[account_id] = m
        if any(not m.allow_negative and m.available() < 0 for m in books.values()):
            return None
        return books

    def commit(self, books: dict[str, Model], posted_at: str) -> None:
        self.books = books
        self.history.append((posted_at, dict(books)))


def transfer_moves(world: World, debit: int, credit: int, amount: int) -> list:
    return [(world.ids[debit], "debit", amount, "posted"), (world.ids[credit], "credit", amount, "posted")]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=operations)
async def test_random_sequences_keep_the_ledger_balanced_at_every_instant(api, ledger_db, sessionmaker, ops):
    tenant = api.for_tenant(f"prop-{uuid.uuid4().hex[:10]}")
    opened = [await tenant.account(normal_balance=n, allow_negative=a) for n, a in ACCOUNTS]
    funding = await tenant.system_account("funding")
    ids = [a["id"] for a in opened] + [funding["id"]]  # index -1 is funding
    world = World(ids=ids, books={a["id"]: Model(n, neg) for a, (n, neg) in zip(opened, ACCOUNTS)}
                  | {funding["id"]: Model("debit", True)})

    for op in ops:
        kind = op[0]
        if kind in ("transfer", "split"):
            if kind == "transfer":
                _, debit, credit, amount = op
                moves = transfer_moves(world, debit, credit, amount)
            else:
                _, debit, credit_a, credit_b, amount_a, amount_b = op
                moves = [(ids[debit], "debit", amount_a + amount_b, "posted"),
                         (ids[credit_a], "credit", amount_a, "posted"), (ids[credit_b], "credit", amount_b, "posted")]
            response = await tenant.post("/v1/ledger/transactions", {"entries": [
                {"account_id": a, "direction": d, "amount": n} for a, d, n, _ in moves]})
            expected = world.apply(moves)
            assert response.status_code == (201 if expected else 422), (op, response.text)
            if expected:
                world.commit(expected, response.json()["posted_at"])
                world.transactions.append({"id": response.json()["id"], "moves": moves})
        elif kind == "bulk":
            _, items, atomic = op
            body = {"atomic": atomic, "transactions": [{"entries": [
                {"account_id": a, "direction": d, "amount": n} for a, d, n, _ in transfer_moves(world, *item)]}
                for item in items]}
            response = await tenant.post("/v1/ledger/transactions/bulk", body)
            staged, accepted, refused = world.books, [], False
            for item in items:
                trial = World(ids, staged).apply(transfer_moves(world, *item))
                if trial is None:
                    refused = True
                    accepted.append(False)
                else:
                    staged = trial
                    accepted.append(True)
            if atomic and refused:
                assert response.status_code == 422, (op, response.text)
                continue
            assert response.status_code == (201 if atomic else 200), (op, response.text)
            results = response.json()["data"]
            assert [r["status"] == "posted" for r in results] == accepted, (op, results)
            if any(accepted):
                world.commit(staged, next(r["posted_at"] for r in results if r["transaction_id"]))
                for item, result in zip(items, results):
                    if result["transaction_id"]:
                        world.transactions.append({"id": result["transaction_id"],
                                                   "moves": transfer_moves(world, *item)})
        elif kind == "hold":
            _, debit, credit, amount = op
            response = await tenant.hold(ids[debit], ids[credit], amount)
            if debit == credit:
                assert response.status_code == 422
                continue
            moves = [(ids[debit], "debit", amount, "pending"), (ids[credit], "credit", amount, "pending")]
            expected = world.apply(moves)
            assert response.status_code == (201 if expected else 422), (op, response.text)
            if expected:
                world.commit(expected, response.json()["created_at"])
                world.holds.append({"id": response.json()["id"], "debit": ids[debit], "credit": ids[credit],
                                    "amount": amount, "open": True})
        elif kind in ("post", "void"):
            if not world.holds:
                continue
            hold = world.holds[op[1] % len(world.holds)]
            amount = op[2] if kind == "post" else None
            response = await tenant.post(f"/v1/ledger/holds/{hold['id']}/{kind}",
                                         {"amount": amount} if amount is not None else None)
            if not hold["open"]:
                assert response.status_code == 409, (op, response.text)
                continue
            if kind == "post" and amount is not None and amount > hold["amount"]:
                assert response.status_code == 422, (op, response.text)
                continue
            assert response.status_code == 200, (op, response.text)
            moves = [(hold["debit"], "debit", hold["amount"], "released"),
                     (hold["credit"], "credit", hold["amount"], "released")]
            if kind == "post":
                posted = hold["amount"] if amount is None else amount
                moves += [(hold["debit"], "debit", posted, "posted"), (hold["credit"], "credit", posted, "posted")]
                world.transactions.append({"id": response.json()["resolved_transaction_id"], "moves": moves[2:]})
            expected = world.apply(moves)
            assert expected is not None  # resolving a hold only frees money
            world.commit(expected, response.json()["resolved_at"])
            hold["open"] = False
        elif kind == "reverse":
            if not world.transactions:
                continue
            original = world.transactions[op[1] % len(world.transactions)]
            response = await tenant.post(f"/v1/ledger/transactions/{original['id']}/reverse")
            if original["id"] in world.reversed:
                assert response.status_code == 409, (op, response.text)
                continue
            moves = [(a, "credit" if d == "debit" else "debit", n, layer) for a, d, n, layer in original["moves"]]
            expected = world.apply(moves)
            assert response.status_code == (201 if expected else 422), (op, response.text)
            if expected:
                world.commit(expected, response.json()["posted_at"])
                world.reversed.add(original["id"])
                world.transactions.append({"id": response.json()["id"], "moves": moves})

    # Invariant 1: every transaction of the tenant balances per currency and layer, and
    # the tenant's posted totals sum to zero.
    async with sessionmaker() as session:
        unbalanced = (await session.execute(text(
            "SELECT transaction_id FROM entries WHERE tenant_id = :t GROUP BY transaction_id, currency, kind "
            "HAVING sum(CASE direction WHEN 'debit' THEN amount ELSE -amount END) <> 0"), {"t": tenant.tenant})).all()
        totals = (await session.execute(text(
            "SELECT coalesce(sum(posted_debits), 0), coalesce(sum(posted_credits), 0) FROM balances "
            "WHERE tenant_id = :t"), {"t": tenant.tenant})).one()
    assert unbalanced == [] and totals[0] == totals[1]

    # Invariant 2: at every instant something happened (and just before it), the API's
    # balance = the model = the sum of the raw entries up to that instant.
    previous = {account_id: Model(m.normal, m.allow_negative) for account_id, m in world.books.items()}
    for posted_at, books in world.history:
        before = (datetime.fromisoformat(posted_at) - timedelta(microseconds=1)).isoformat()
        for instant, state in ((before, previous), (posted_at, books)):
            for account_id, model in state.items():
                balance = await tenant.balance(account_id, instant)
                assert (balance["posted"], balance["pending"], balance["available"]) == (
                    model.posted(), model.pending(), model.available()), (instant, account_id)
                async with sessionmaker() as session:
                    summed = (await session.execute(text(
                        "SELECT coalesce(sum(amount) FILTER (WHERE kind = 'posted' AND direction = 'debit'), 0), "
                        "coalesce(sum(amount) FILTER (WHERE kind = 'posted' AND direction = 'credit'), 0) "
                        "FROM entries WHERE account_id = :a AND posted_at <= :t"),
                        {"a": uuid.UUID(account_id), "t": datetime.fromisoformat(instant)})).one()
                assert (balance["posted_debits"], balance["posted_credits"]) == tuple(summed)
        previous = books
    assert await verify(ledger_db.app_url) == []
