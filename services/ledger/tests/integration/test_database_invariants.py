"""The invariants PostgreSQL enforces by itself, tried with the service's own role and
raw SQL (as a bug in the service would): a journal transaction balances per currency at
commit, entries only join a transaction of the same database transaction and an account
of the same tenant and currency, amounts are positive, and a non-negative account's
balance row refuses to go below zero available."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timezone

import asyncpg
import pytest

from shared.db import plain_url

HASH = hashlib.sha256(b"x").digest()


@pytest.fixture
async def sql(ledger_db):
    conn = await asyncpg.connect(plain_url(ledger_db.app_url))
    yield conn
    await conn.close()


@pytest.fixture
async def accounts(api):
    alice, bob = await api.account(allow_negative=True), await api.account()
    dollars = await api.account(currency="USD")
    return {"alice": uuid.UUID(alice["id"]), "bob": uuid.UUID(bob["id"]), "dollars": uuid.UUID(dollars["id"]),
            "tenant": api.tenant}


async def _write(sql, tenant: str, legs: list[tuple[uuid.UUID, str, int, str]],
                 transaction_id: uuid.UUID | None = None, insert_transaction: bool = True) -> uuid.UUID:
    transaction_id = transaction_id or uuid.uuid4()
    now = datetime.now(timezone.utc)
    if insert_transaction:
        await sql.execute("INSERT INTO transactions (id, tenant_id, kind, posted_at, hash) "
                          "VALUES ($1, $2, 'standard', $3, $4)", transaction_id, tenant, now, HASH)
        posted_at = now
    else:
        posted_at = await sql.fetchval("SELECT posted_at FROM transactions WHERE id = $1", transaction_id)
    for index, (account, direction, amount, currency) in enumerate(legs):
        await sql.execute(
            "INSERT INTO entries (transaction_id, entry_index, tenant_id, account_id, account_version, direction, "
            "kind, amount, currency, posted_at, posted_debits, posted_credits, pending_debits, pending_credits) "
            "VALUES ($1, $2, $3, $4, $5, $6, 'posted', $7, $8, $9, 0, 0, 0, 0)",
            transaction_id, index + (100 if not insert_transaction else 0), tenant, account,
            10_000 + index + (100 if not insert_transaction else 0), direction, amount, currency, posted_at)
    return transaction_id


async def test_an_unbalanced_journal_transaction_cannot_commit(sql, accounts):
    tenant = accounts["tenant"]
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance in EUR"):
        async with sql.transaction():
            await _write(sql, tenant, [(accounts["alice"], "debit", 100, "EUR"),
                                       (accounts["bob"], "credit", 99, "EUR")])
    with pytest.raises(asyncpg.CheckViolationError, match="at least 2 are required"):
        async with sql.transaction():
            await _write(sql, tenant, [(accounts["alice"], "debit", 100, "EUR")])
    async with sql.transaction():  # the same shape, balanced, commits
        await _write(sql, tenant, [(accounts["alice"], "debit", 100, "EUR"), (accounts["bob"], "credit", 100, "EUR")])


async def test_a_posted_transaction_never_gains_entries(sql, accounts):
    tenant = accounts["tenant"]
    async with sql.transaction():
        posted = await _write(sql, tenant, [(accounts["alice"], "debit", 5, "EUR"),
                                            (accounts["bob"], "credit", 5, "EUR")])
    with pytest.raises(asyncpg.CheckViolationError, match="posted by another database transaction"):
        async with sql.transaction():  # balanced on its own, and still refused
            await _write(sql, tenant, [(accounts["alice"], "debit", 7, "EUR"), (accounts["bob"], "credit", 7, "EUR")],
                         transaction_id=posted, insert_transaction=False)


async def test_entries_must_match_their_accounts_tenant_and_currency(sql, accounts):
    with pytest.raises(asyncpg.CheckViolationError, match="no such account in this tenant and currency"):
        async with sql.transaction():
            await _write(sql, accounts["tenant"], [(accounts["alice"], "debit", 5, "EUR"),
                                                   (accounts["dollars"], "credit", 5, "EUR")])
    with pytest.raises(asyncpg.CheckViolationError, match="no such account"):
        async with sql.transaction():
            await _write(sql, "another-tenant", [(accounts["alice"], "debit", 5, "EUR"),
                                                 (accounts["bob"], "credit", 5, "EUR")])


async def test_amounts_are_positive_and_bounded(sql, accounts):
    for amount in (0, -5, 10**15 + 1):
        with pytest.raises(asyncpg.CheckViolationError):
            async with sql.transaction():
                await _write(sql, accounts["tenant"], [(accounts["alice"], "debit", amount, "EUR"),
                                                       (accounts["bob"], "credit", amount, "EUR")])


async def test_a_non_negative_balance_row_refuses_to_go_below_zero(sql, accounts):
    with pytest.raises(asyncpg.CheckViolationError, match="balances_available_non_negative"):
        await sql.execute("UPDATE balances SET posted_debits = 1 WHERE account_id = $1", accounts["bob"])
    # An account allowed negative may go there (rolled back: the test only asks the CHECK).
    attempt = sql.transaction()
    await attempt.start()
    try:
        await sql.execute("UPDATE balances SET posted_debits = 1 WHERE account_id = $1", accounts["alice"])
    finally:
        await attempt.rollback()
