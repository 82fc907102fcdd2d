"""Domain events: what an aggregate records when it changes, before anyone stores it.

Plain data, no I/O. The unit of work stamps the context (actor, correlation, trace) and
appends them to the service's event log in the same transaction as the state change.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

EVENT_TYPE = re.compile(r"^[a-z][a-z_]*(\.[a-z][a-z_]*)+\.v([0-9]+)$")


def schema_version(event_type: str) -> int:
    match = EVENT_TYPE.match(event_type)
    if not match:
        raise ValueError(f"event type {event_type!r} is not '<aggregate>.<past-tense verb>.v<N>'")
    return int(match.group(2))


@dataclass
class DomainEvent:
    type: str  # e.g. "payment.settled.v1"
    aggregate_type: str
    aggregate_id: str
    payload: dict[str, Any]
    tenant_id: str | None = None
    actor: str | None = None  # defaults to the context's actor when stored
    reason: str | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    occurred_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    # Who caused it and in which trace: stamped from the context when the event is
    # recorded into a unit of work (see `shared.uow.UnitOfWork.stamp_events`).
    correlation_id: str | None = None
    causation_id: str | None = None
    traceparent: str | None = None
    stamped: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        schema_version(self.type)


class Aggregate:
    """Base for entities that record events (cosmicpython's pattern): transitions append
    to `self.events`; the unit of work drains them."""

    def __init__(self) -> None:
        self.events: list[DomainEvent] = []

    def record(self, event: DomainEvent) -> None:
        self.events.append(event)
