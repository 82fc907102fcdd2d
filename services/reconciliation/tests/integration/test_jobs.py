"""The run worker's recovery: a run whose worker died is claimed again when its lease
ends; one that keeps killing its workers is failed, with an event, not retried for ever."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from services.reconciliation import jobs
from services.reconciliation.tests.integration.harness import headers, rows, sandbox_csv, scalar, upload


async def _queued_run(client, private_pem, tenant) -> str:
    statement = await upload(client, private_pem, tenant, sandbox_csv([(str(uuid.uuid4()), 100, "EUR", "2026-03-02")]))
    created = await client.post("/v1/reconciliation/runs", json={"statement_id": statement.json()["id"]},
                                headers=headers(private_pem, tenant=tenant))
    return created.json()["id"]


async def test_a_run_whose_worker_died_is_claimed_again(client, private_pem, tenant, settings, sessionmaker):
    run_id = await _queued_run(client, private_pem, tenant)
    # A worker claimed it, then vanished: running, attempt 1, lease already over.
    async with sessionmaker() as session, session.begin():
        await session.execute(text("UPDATE runs SET status = 'running', attempts = 1, "
                                   "lease_until = clock_timestamp() - interval '1 second' WHERE id = :id"),
                              {"id": uuid.UUID(run_id)})
    while await jobs.run_once(sessionmaker, settings=settings) is not None:
        pass
    found = (await client.get(f"/v1/reconciliation/runs/{run_id}", headers=headers(private_pem, tenant=tenant))).json()
    assert (found["status"], found["attempts"]) == ("completed", 2)


async def test_a_run_that_keeps_dying_is_failed_with_an_event(client, private_pem, tenant, settings, sessionmaker):
    run_id = await _queued_run(client, private_pem, tenant)
    async with sessionmaker() as session, session.begin():
        await session.execute(text("UPDATE runs SET status = 'running', attempts = :n, "
                                   "lease_until = clock_timestamp() - interval '1 second' WHERE id = :id"),
                              {"id": uuid.UUID(run_id), "n": settings.run_max_attempts})
    await jobs.run_once(sessionmaker, settings=settings)
    found = (await client.get(f"/v1/reconciliation/runs/{run_id}", headers=headers(private_pem, tenant=tenant))).json()
    assert (found["status"], found["error_code"]) == ("failed", "attempts_exhausted")
    events = await rows(sessionmaker, "SELECT type, payload FROM events WHERE aggregate_id = :id ORDER BY seq",
                        id=run_id)
    assert [e.type for e in events] == ["reconciliation.run.requested.v1", "reconciliation.run.failed.v1"]
    assert events[-1].payload["error_code"] == "attempts_exhausted"
    assert await scalar(sessionmaker, "SELECT count(*) FROM matches WHERE tenant_id = :t", t=tenant) == 0
