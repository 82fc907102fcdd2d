"""`verify` finds what it promises to find: a projection edited behind the domain's
back, money moving twice, an approval missing, and PII stored in the clear."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from services.payments.tests.integration.harness import asgi_client, headers, payment_body
from services.payments.verify import verify
from shared.db import plain_url


@pytest.fixture
async def owner(db):
    """The migration owner: only it can edit behind the service's back (the runtime role
    has no such grants)."""
    conn = await asyncpg.connect(plain_url(db.owner_url))
    yield conn
    await conn.close()


async def created(app, private_pem) -> str:
    async with asgi_client(app) as http:
        return (await http.post("/v1/payments", json=payment_body(), headers=headers(private_pem))).json()["id"]


async def test_a_clean_database_verifies(app, private_pem, db):
    await created(app, private_pem)
    assert await verify(db.app_url) == []


async def test_an_edited_projection_is_reported(app, private_pem, db, owner):
    pid = await created(app, private_pem)
    await owner.execute("UPDATE payments SET amount = amount + 1 WHERE id = $1", uuid.UUID(pid))
    try:
        problems = await verify(db.app_url)
        assert any(pid in p and "amount" in p and "event log says" in p for p in problems), problems
    finally:
        await owner.execute("UPDATE payments SET amount = amount - 1 WHERE id = $1", uuid.UUID(pid))


async def test_an_approved_payment_without_a_granted_approval_is_reported(app, private_pem, db, owner):
    pid = await created(app, private_pem)
    await owner.execute("UPDATE payments SET status = 'approved', approval_id = 'forged' WHERE id = $1",
                        uuid.UUID(pid))
    try:
        problems = await verify(db.app_url)
        assert f"payment {pid} is approved without a recorded granted approval" in problems
    finally:
        await owner.execute("UPDATE payments SET status = 'pending_approval', approval_id = NULL WHERE id = $1",
                            uuid.UUID(pid))


async def test_plaintext_pii_is_reported(app, private_pem, db, owner):
    await owner.execute("ALTER TABLE payments ADD COLUMN payee_iban text")
    try:
        problems = await verify(db.app_url)
        assert "column payments.payee_iban looks like PII outside the vault" in problems
    finally:
        await owner.execute("ALTER TABLE payments DROP COLUMN payee_iban")


async def test_the_runtime_role_cannot_rewrite_history_or_delete(app, private_pem, db):
    pid = await created(app, private_pem)
    conn = await asyncpg.connect(plain_url(db.app_url))
    try:
        for statement in ("DELETE FROM payments WHERE id = $1::uuid",
                          "DELETE FROM payee_vault WHERE payment_id = $1::uuid",
                          "UPDATE payee_vault SET key_id = 'x' WHERE payment_id = $1::uuid",
                          "DELETE FROM processor_webhook_events WHERE attempt_id = $1::uuid",
                          "UPDATE events SET payload = '{}' WHERE aggregate_id = $1"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement, pid)
    finally:
        await conn.close()
