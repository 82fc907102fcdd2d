"""The database's own guards (what the code promises, refused even to a buggy writer) and
`verify`, which must find every broken promise in a tampered database. This module has a
database of its own, because tampering with it is the point."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from services.approvals.tests.integration.conftest import open_payment
from services.approvals.verify import verify
from shared.db import plain_url


async def run_as_app(sessionmaker, sql: str, **params) -> None:
    async with sessionmaker() as session, session.begin():
        await session.execute(text(sql), params)


async def test_the_database_refuses_a_decision_by_the_maker(sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=100_000, maker="mia")
    with pytest.raises(DBAPIError, match="the maker never decides"):
        await run_as_app(sessionmaker, "INSERT INTO approval_decisions (id, request_id, tenant_id, principal, decision, "
                                       "decided_at) VALUES (:id, :r, :t, 'mia', 'approve', now())",
                         id=uuid.uuid4(), r=request.id, t=tenant)


async def test_the_database_refuses_a_grant_without_quorum_and_a_changed_outcome(sessionmaker, settings, tenant):
    pending = await open_payment(sessionmaker, settings, tenant, amount=1_000_000)
    granted = await open_payment(sessionmaker, settings, tenant, amount=100)
    with pytest.raises(DBAPIError, match="granted with 0 of 2 required approvals"):
        await run_as_app(sessionmaker, "UPDATE approval_requests SET status = 'granted', resolved_at = now() "
                                       "WHERE id = :id", id=pending.id)
    with pytest.raises(DBAPIError, match="the outcome of a request is final"):
        await run_as_app(sessionmaker, "UPDATE approval_requests SET status = 'rejected' WHERE id = :id", id=granted.id)
    with pytest.raises(DBAPIError, match="permission denied"):
        await run_as_app(sessionmaker, "UPDATE approval_requests SET required_approvals = 0 WHERE id = :id",
                         id=pending.id)
    with pytest.raises(DBAPIError, match="permission denied"):
        await run_as_app(sessionmaker, "DELETE FROM approval_requests WHERE id = :id", id=pending.id)


async def test_verify_finds_a_grant_without_approvals_and_a_table_that_left_its_log(
        platform, database, sessionmaker, settings, tenant):
    honest = await open_payment(sessionmaker, settings, tenant, amount=100_000)
    forged = await open_payment(sessionmaker, settings, tenant, amount=1_000_000)
    assert await verify(database.app_url) == []

    # An intruder with superuser rights switches the guards off and grants a payment.
    conn = await asyncpg.connect(plain_url(platform.superuser_url(database)))
    try:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("UPDATE approval_requests SET status = 'granted', resolved_at = $2 WHERE id = $1",
                           forged.id, datetime.now(timezone.utc))
        await conn.execute("INSERT INTO approval_decisions (id, request_id, tenant_id, principal, decision, decided_at) "
                           "VALUES ($1, $2, $3, 'maker', 'approve', now())", uuid.uuid4(), honest.id, tenant)
    finally:
        await conn.close()

    problems = await verify(database.app_url)
    assert any(f"approval {forged.id}: granted with 0 of 2" in p for p in problems), problems
    assert any(f"approval {forged.id}: the table differs from the rebuild" in p and "status" in p
               for p in problems), problems
    assert any(f"approval {honest.id}: decided by its maker ['maker']" in p for p in problems), problems
    assert any(f"approval {honest.id}: the table differs" in p and "decisions" in p for p in problems), problems
