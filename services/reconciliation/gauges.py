"""The open breaks' gauges, refreshed by the consumer process every few seconds
(`shared.metrics.refresh_periodically`), never per request:

    clearhouse_reconciliation_breaks_open{type, age}                  open breaks by type and
                                                                      age band (under_1h,
                                                                      1h_to_1d, over_1d)
    clearhouse_reconciliation_oldest_open_break_age_seconds{type}     the oldest one's age

Only open breaks are read, through the partial index `breaks_open_by_target` (status =
open): resolved history never enters the query.
"""

from __future__ import annotations

from prometheus_client import Gauge
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.reconciliation.domain import BreakType

AGE_BANDS = ("under_1h", "1h_to_1d", "over_1d")

BREAKS_OPEN = Gauge("clearhouse_reconciliation_breaks_open", "Open reconciliation breaks, by type and age band",
                    ["type", "age"])
OLDEST_OPEN_BREAK_AGE = Gauge("clearhouse_reconciliation_oldest_open_break_age_seconds",
                              "Age of the oldest open break of this type", ["type"])

_OPEN = text("""
    SELECT type,
           count(*) FILTER (WHERE opened_at > clock_timestamp() - interval '1 hour'),
           count(*) FILTER (WHERE opened_at <= clock_timestamp() - interval '1 hour'
                              AND opened_at > clock_timestamp() - interval '1 day'),
           count(*) FILTER (WHERE opened_at <= clock_timestamp() - interval '1 day'),
           EXTRACT(EPOCH FROM clock_timestamp() - min(opened_at))
    FROM breaks WHERE status = 'open' GROUP BY type
""")


async def refresh(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    async with sessionmaker() as session:
        found = {row[0]: row[1:] for row in await session.execute(_OPEN)}
    for break_type in BreakType:  # every type always reported: 0 is news too
        *bands, oldest = found.get(break_type.value, (0, 0, 0, 0.0))
        for band, count in zip(AGE_BANDS, bands):
            BREAKS_OPEN.labels(break_type.value, band).set(count)
        OLDEST_OPEN_BREAK_AGE.labels(break_type.value).set(float(oldest or 0.0))
