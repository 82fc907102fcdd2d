"""The open-breaks gauges: open breaks by type and age band, and the oldest one's age, as
an SRE's dashboard and the ReconciliationBreakOlderThanADay alert read them."""

from __future__ import annotations

import uuid

import asyncpg
from prometheus_client import REGISTRY

from services.reconciliation import gauges
from services.reconciliation.domain import BreakType
from services.reconciliation.tests.integration.harness import run_statement, sandbox_csv, upload

DAY = "2026-03-02"


def open_breaks(break_type: str, age: str) -> float:
    return REGISTRY.get_sample_value("clearhouse_reconciliation_breaks_open", {"type": break_type, "age": age})


def oldest(break_type: str) -> float:
    return REGISTRY.get_sample_value("clearhouse_reconciliation_oldest_open_break_age_seconds", {"type": break_type})


async def test_open_breaks_are_counted_by_type_and_age_band(client, private_pem, tenant, settings, sessionmaker, db,
                                                            platform):
    await gauges.refresh(sessionmaker)
    for break_type in BreakType:  # every type is reported, at zero, before any break exists
        assert [open_breaks(break_type, band) for band in gauges.AGE_BANDS] == [0, 0, 0]
        assert oldest(break_type) == 0

    # Three payouts on the bank statement that payments never made: three breaks.
    statement = await upload(client, private_pem, tenant, sandbox_csv(
        [(str(uuid.uuid4()), amount, "EUR", DAY) for amount in (1_000, 2_000, 3_000)]))
    assert statement.status_code == 201, statement.text
    run = await run_statement(client, private_pem, tenant, statement.json()["id"], sessionmaker, settings)
    assert run["breaks"] == 3
    # Age two of them as a day and two hours and as three hours (the superuser plays time).
    conn = await asyncpg.connect(platform.superuser_url(db))
    try:
        ids = await conn.fetch("SELECT id FROM breaks WHERE tenant_id = $1 ORDER BY amount", tenant)
        await conn.execute("UPDATE breaks SET opened_at = clock_timestamp() - interval '26 hours' WHERE id = $1",
                           ids[0]["id"])
        await conn.execute("UPDATE breaks SET opened_at = clock_timestamp() - interval '3 hours' WHERE id = $1",
                           ids[1]["id"])
    finally:
        await conn.close()

    await gauges.refresh(sessionmaker)
    found = "missing_in_payments"
    assert [open_breaks(found, band) for band in gauges.AGE_BANDS] == [1, 1, 1]
    assert 26 * 3600 <= oldest(found) < 27 * 3600
    assert open_breaks("duplicate", "under_1h") == 0 and oldest("duplicate") == 0
