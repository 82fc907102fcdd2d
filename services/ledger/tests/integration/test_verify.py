"""`verify` finds nothing wrong with a ledger written through the API, and names what an
attacker with superuser access to the database changed behind the service's back."""

from __future__ import annotations

import contextlib
import uuid

import asyncpg
import pytest

from services.ledger.api import MIGRATIONS, create_app
from services.ledger.settings import Settings
from services.ledger.tests.integration.client import LedgerApi
from services.ledger.verify import verify
from shared.db import plain_url


@pytest.fixture
async def ledger(platform, internal_keys):
    """A fresh ledger with a little of everything in it: transfers, a reversal, a posted,
    a voided and a pending hold. Yields (database, ids)."""
    db = await platform.database(MIGRATIONS, prefix="ledgerverify")
    app = create_app(Settings(database_url=db.app_url, INTERNAL_TOKEN_PUBLIC_KEY=internal_keys[1], db_pool_size=5))
    async with LedgerApi.connect(app, private_pem=internal_keys[0], tenant="t-verify") as api:
        alice, bob = await api.account(), await api.account()
        funded = await api.fund(alice, 10_000)
        paid = (await api.transfer(alice["id"], bob["id"], 1_000)).json()
        assert (await api.post(f"/v1/ledger/transactions/{paid['id']}/reverse")).status_code == 201
        posted = (await api.hold(alice["id"], bob["id"], 500)).json()
        assert (await api.post(f"/v1/ledger/holds/{posted['id']}/post", {"amount": 300})).status_code == 200
        voided = (await api.hold(alice["id"], bob["id"], 200)).json()
        assert (await api.post(f"/v1/ledger/holds/{voided['id']}/void")).status_code == 200
        pending = (await api.hold(alice["id"], bob["id"], 100)).json()
        last = (await api.transfer(alice["id"], bob["id"], 50)).json()
    await app.state.engine.dispose()
    yield db, {"alice": alice["id"], "bob": bob["id"], "funded": funded["id"], "paid": paid["id"],
               "posted_hold": posted["id"], "pending_hold": pending["id"], "last": last["id"]}


@contextlib.asynccontextmanager
async def attacker(platform, db):
    """A superuser session with triggers off, as someone with the database's keys."""
    conn = await asyncpg.connect(plain_url(platform.superuser_url(db)))
    try:
        await conn.execute("SET session_replication_role = replica")
        yield conn
    finally:
        await conn.close()


async def test_a_ledger_written_through_the_service_verifies_clean(ledger):
    db, _ = ledger
    assert await verify(db.app_url) == []


async def test_an_edited_entry_amount_is_caught(ledger, platform):
    db, ids = ledger
    async with attacker(platform, db) as sql:
        await sql.execute("UPDATE entries SET amount = amount + 1 WHERE transaction_id = $1 AND entry_index = 1",
                          uuid.UUID(ids["paid"]))
    found = "\n".join(await verify(db.app_url))
    assert f"transaction {ids['paid']}: does not balance in EUR (posted layer): debits 1000, credits 1001" in found
    assert f"transaction {ids['paid']}: stored hash" in found
    assert f"account {ids['bob']}: balance row posted_credits" in found  # projection ≠ rebuild
    assert "running posted_credits" in found


async def test_an_edited_description_with_a_recomputed_hash_still_breaks_the_chain(ledger, platform):
    db, ids = ledger
    async with attacker(platform, db) as sql:
        # Even recomputing this row's hash does not help: every later transaction of both
        # accounts chains to the old one.
        await sql.execute("UPDATE transactions SET description = 'nothing to see', hash = sha256(hash) WHERE id = $1",
                          uuid.UUID(ids["paid"]))
    found = await verify(db.app_url)
    assert any(f"transaction {ids['paid']}: stored hash" in v for v in found)
    assert sum("stored hash" in v for v in found) >= 2, found


async def test_a_rewritten_balance_and_a_reopened_hold_are_caught(ledger, platform):
    db, ids = ledger
    async with attacker(platform, db) as sql:
        await sql.execute("UPDATE balances SET posted_credits = posted_credits + 1000000 WHERE account_id = $1",
                          uuid.UUID(ids["alice"]))
        await sql.execute("UPDATE holds SET status = 'pending', amount_posted = 0, resolved_transaction_id = NULL, "
                          "resolved_at = NULL WHERE id = $1", uuid.UUID(ids["posted_hold"]))
    found = "\n".join(await verify(db.app_url))
    assert f"account {ids['alice']}: balance row posted_credits" in found
    assert "currency EUR: posted debits" in found  # the sum over all accounts is no longer zero
    assert f"hold {ids['posted_hold']}: row says pending but the journal says hold_posted" in found


async def test_a_deleted_transaction_is_caught(ledger, platform):
    db, ids = ledger
    async with attacker(platform, db) as sql:
        await sql.execute("DELETE FROM entries WHERE transaction_id = $1", uuid.UUID(ids["last"]))
        await sql.execute("DELETE FROM transactions WHERE id = $1", uuid.UUID(ids["last"]))
    found = "\n".join(await verify(db.app_url))
    assert f"account {ids['alice']}: head hash" in found
    assert f"transaction {ids['last']}: event ledger.transaction.posted.v1 has no journal fact" in found


async def test_a_second_resolution_of_a_hold_is_caught(ledger, platform):
    db, ids = ledger
    async with attacker(platform, db) as sql:
        # Copy the posted hold's resolution under a new id (the unique index must go first).
        await sql.execute("DROP INDEX transactions_hold_resolved")
        resolved = await sql.fetchval("SELECT resolved_transaction_id FROM holds WHERE id = $1",
                                      uuid.UUID(ids["posted_hold"]))
        twin = uuid.uuid4()
        await sql.execute("INSERT INTO transactions (id, tenant_id, kind, hold_id, posted_at, hash, metadata) "
                          "SELECT $2, tenant_id, kind, hold_id, posted_at, hash, metadata FROM transactions "
                          "WHERE id = $1", resolved, twin)
        await sql.execute("INSERT INTO entries SELECT $2, entry_index, tenant_id, account_id, account_version + 1000, "
                          "direction, kind, amount, currency, posted_at, posted_debits, posted_credits, "
                          "pending_debits, pending_credits FROM entries WHERE transaction_id = $1", resolved, twin)
    found = "\n".join(await verify(db.app_url))
    assert f"hold {ids['posted_hold']}: resolved 2 times (posted or voided twice)" in found
    assert f"follows v" in found  # the copied entries break the version sequence


async def test_the_service_role_cannot_rewrite_history(ledger):
    db, ids = ledger
    conn = await asyncpg.connect(plain_url(db.app_url))
    try:
        for statement in ("UPDATE entries SET amount = 1", "DELETE FROM transactions",
                          "UPDATE transactions SET description = 'x'", "DELETE FROM accounts",
                          "TRUNCATE entries", "UPDATE payment_reservations SET reason = 'x'", "DELETE FROM holds"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()
    assert await verify(db.app_url) == []


async def test_the_owner_cannot_rewrite_history_either(ledger):
    db, ids = ledger
    conn = await asyncpg.connect(plain_url(db.owner_url))
    try:
        for statement in ("UPDATE entries SET amount = 1", "DELETE FROM transactions", "TRUNCATE entries",
                          "UPDATE accounts SET currency = 'USD'"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement)
        with pytest.raises(asyncpg.CheckViolationError, match="already posted"):
            await conn.execute("UPDATE holds SET status = 'voided' WHERE id = $1", uuid.UUID(ids["posted_hold"]))
    finally:
        await conn.close()
