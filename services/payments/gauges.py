"""The payments gauges, refreshed by the consumer process every few seconds
(`shared.metrics.refresh_periodically`), never per request:

    clearhouse_payments_in_flight{status}                       payments waiting in a status
    clearhouse_payments_oldest_in_flight_age_seconds{status}    since when the oldest one waits

for the statuses a payment passes through (pending_approval, approved, submitted); the
partial index `payments_in_flight` keeps the query as small as what is in flight. How many
payments reach each status per second is `clearhouse_events_published_total{service=
"payments", type="payment.<status>.v1"}`, counted by the relay as it publishes.
"""

from __future__ import annotations

from prometheus_client import Gauge
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.payments.domain import PaymentStatus

IN_FLIGHT_STATUSES = (PaymentStatus.PENDING_APPROVAL, PaymentStatus.APPROVED, PaymentStatus.SUBMITTED)

IN_FLIGHT = Gauge("clearhouse_payments_in_flight", "Payments waiting in a non-final status", ["status"])
OLDEST_IN_FLIGHT_AGE = Gauge("clearhouse_payments_oldest_in_flight_age_seconds",
                             "Time since the oldest payment in this status last changed", ["status"])

# The IN list repeats the partial index's predicate so the planner can use it.
_IN_FLIGHT = text("""
    SELECT status, count(*), EXTRACT(EPOCH FROM clock_timestamp() - min(updated_at))
    FROM payments WHERE status IN ('pending_approval', 'approved', 'submitted') GROUP BY status
""")


async def refresh(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    async with sessionmaker() as session:
        found = {status: (count, age) for status, count, age in await session.execute(_IN_FLIGHT)}
    for status in IN_FLIGHT_STATUSES:  # every status always reported: 0 is news too
        count, age = found.get(status.value, (0, 0.0))
        IN_FLIGHT.labels(status.value).set(count)
        OLDEST_IN_FLIGHT_AGE.labels(status.value).set(float(age or 0.0))
