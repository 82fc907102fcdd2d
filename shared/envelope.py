"""CloudEvents 1.0 in Kafka binary mode: attributes as `ce_*` headers, the JSON data as the
value, W3C `traceparent` beside them.

Both directions live here so producer and consumer cannot drift apart. Decoding is
lenient about what it does not know (extra headers, extra data fields) and strict about
what it needs (id, type, source).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

SPEC_VERSION = "1.0"


class EnvelopeError(ValueError):
    """A message that is not a Clearhouse CloudEvent (missing id/type/source or bad JSON)."""


@dataclass(frozen=True)
class StoredEvent:
    """A row of a service's event log, as the relay reads it."""

    seq: int
    id: uuid.UUID
    tenant_id: str | None
    aggregate_type: str
    aggregate_id: str
    type: str
    schema_version: int
    payload: Any  # jsonb as text or already decoded
    actor: str
    reason: str | None
    correlation_id: str | None
    causation_id: str | None
    traceparent: str | None
    occurred_at: datetime


@dataclass(frozen=True)
class InboundEvent:
    id: uuid.UUID
    type: str
    source: str
    subject: str | None
    time: str | None
    data: dict[str, Any]
    tenant_id: str | None = None
    actor: str | None = None
    reason: str | None = None
    correlation_id: str | None = None
    aggregate_type: str | None = None
    traceparent: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)


def _b(value: str | None) -> bytes:
    return (value or "").encode()


def encode(event: StoredEvent, *, source: str, traceparent: str | None) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) for one stored event; key = aggregate id keeps per-aggregate order."""
    payload = event.payload
    value = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    headers = [
        ("ce_specversion", SPEC_VERSION.encode()),
        ("ce_id", str(event.id).encode()),
        ("ce_source", source.encode()),
        ("ce_type", event.type.encode()),
        ("ce_subject", event.aggregate_id.encode()),
        ("ce_time", event.occurred_at.isoformat().encode()),
        ("content-type", b"application/json"),
        ("ce_aggregatetype", event.aggregate_type.encode()),
        ("ce_seq", str(event.seq).encode()),
        ("ce_actor", event.actor.encode()),
    ]
    for name, attr in (("ce_tenantid", event.tenant_id), ("ce_reason", event.reason),
                       ("ce_correlationid", event.correlation_id), ("ce_causationid", event.causation_id)):
        if attr:
            headers.append((name, _b(attr)))
    if traceparent:
        headers.append(("traceparent", traceparent.encode()))
    return event.aggregate_id.encode(), value, headers


def decode(value: bytes | None, headers: list[tuple[str, bytes]] | tuple) -> InboundEvent:
    attrs = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)) for k, v in headers or ()}
    for required in ("ce_id", "ce_type", "ce_source"):
        if not attrs.get(required):
            raise EnvelopeError(f"missing CloudEvents header {required}")
    try:
        event_id = uuid.UUID(attrs["ce_id"])
    except ValueError as exc:
        raise EnvelopeError(f"ce_id is not a UUID: {attrs['ce_id']!r}") from exc
    try:
        data = orjson.loads(value) if value else {}
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"data is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise EnvelopeError("data is not a JSON object")
    known = {"ce_id", "ce_type", "ce_source", "ce_subject", "ce_time", "ce_tenantid", "ce_actor", "ce_reason",
             "ce_correlationid", "ce_aggregatetype", "traceparent"}
    return InboundEvent(
        id=event_id,
        type=attrs["ce_type"],
        source=attrs["ce_source"],
        subject=attrs.get("ce_subject"),
        time=attrs.get("ce_time"),
        data=data,
        tenant_id=attrs.get("ce_tenantid"),
        actor=attrs.get("ce_actor"),
        reason=attrs.get("ce_reason"),
        correlation_id=attrs.get("ce_correlationid"),
        aggregate_type=attrs.get("ce_aggregatetype"),
        traceparent=attrs.get("traceparent"),
        extra_headers={k: v for k, v in attrs.items() if k not in known},
    )
