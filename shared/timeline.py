"""`GET /internal/timeline?payment_id=`: this service's audit-trail events about one
payment, in the shape the gateway merges into `GET /v1/payments/{id}/timeline`.

Every event about a payment carries `payment_id` in its payload (or has the payment as
its aggregate), which is all this needs. Tenant-scoped like every query; read-only.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlalchemy import text

from shared import context

router = APIRouter(tags=["internal"])

_EVENTS_ABOUT = text(
    """
    SELECT type, occurred_at, actor, reason, correlation_id, traceparent, payload
    FROM events
    WHERE tenant_id = :tenant
      AND (aggregate_id = :payment_id OR payload->>'payment_id' = :payment_id)
    ORDER BY occurred_at, seq
    LIMIT 1000
    """
)


class TimelineEvent(BaseModel):
    service: str
    type: str
    occurred_at: str
    actor: str
    reason: str | None
    correlation_id: str | None
    trace_id: str | None
    data: dict[str, Any]


class TimelinePart(BaseModel):
    events: list[TimelineEvent]


def trace_id_of(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 else None


@router.get("/internal/timeline", response_model=TimelinePart)
async def timeline(request: Request, payment_id: str = Query(min_length=1, max_length=64)) -> TimelinePart:
    service = request.app.state.service_name
    async with request.app.state.sessionmaker() as session:
        rows = await session.execute(_EVENTS_ABOUT, {"tenant": context.current().tenant_id, "payment_id": payment_id})
        return TimelinePart(events=[
            TimelineEvent(service=service, type=r.type, occurred_at=r.occurred_at.isoformat(), actor=r.actor,
                          reason=r.reason, correlation_id=r.correlation_id, trace_id=trace_id_of(r.traceparent),
                          data=r.payload)
            for r in rows
        ])
