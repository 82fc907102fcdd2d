"""The approval queue's gauges, refreshed by the consumer process every few seconds
(`shared.metrics.refresh_periodically`), never per request:

    clearhouse_approvals_pending                         requests waiting for decisions
    clearhouse_approvals_oldest_pending_age_seconds      how long the oldest one has waited

Pending requests are few and the partial index `approval_requests_due` (status = pending)
holds exactly them, so the query never reads the decided history.
"""

from __future__ import annotations

from prometheus_client import Gauge
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

PENDING = Gauge("clearhouse_approvals_pending", "Approval requests waiting for decisions")
OLDEST_PENDING_AGE = Gauge("clearhouse_approvals_oldest_pending_age_seconds",
                           "How long the oldest pending approval request has waited")

_PENDING = text("""
    SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)), 0)
    FROM approval_requests WHERE status = 'pending'
""")


async def refresh(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    async with sessionmaker() as session:
        count, age = (await session.execute(_PENDING)).one()
    PENDING.set(count)
    OLDEST_PENDING_AGE.set(float(age))
