"""The unit of work: one transaction that holds a use case's state changes and the events
its aggregates recorded, written to the event log before commit.

Use cases never commit. `UnitOfWork` commits on a clean exit and rolls back on any
exception, so an event exists in the log iff its state change committed (invariant 6).
`run_in_transaction` retries the whole use case on serialization failures and deadlocks,
which callers never see.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import orjson
from opentelemetry import trace
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import context
from shared.events import Aggregate, DomainEvent, schema_version

T = TypeVar("T")
RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected

_INSERT_EVENTS = text(
    """
    INSERT INTO events (id, tenant_id, aggregate_type, aggregate_id, type, schema_version, payload, actor,
                        reason, correlation_id, causation_id, traceparent, occurred_at)
    SELECT * FROM unnest(
        CAST(:ids AS uuid[]), CAST(:tenants AS text[]), CAST(:agg_types AS text[]), CAST(:agg_ids AS text[]),
        CAST(:types AS text[]), CAST(:versions AS int[]), CAST(:payloads AS jsonb[]), CAST(:actors AS text[]),
        CAST(:reasons AS text[]), CAST(:correlations AS text[]), CAST(:causations AS text[]),
        CAST(:traceparents AS text[]), CAST(:times AS timestamptz[]))
    """
)


def current_traceparent() -> str | None:
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"


def _lock_key(event: DomainEvent) -> str:
    return f"{event.aggregate_type}:{event.aggregate_id}"


class UnitOfWork:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker
        self.session: AsyncSession
        self._events: list[DomainEvent] = []
        self._aggregates: list[Aggregate] = []
        self._after_commit: list[Callable[[], None]] = []

    async def __aenter__(self) -> "UnitOfWork":
        self.session = self._sessionmaker()
        await self.session.begin()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                await self._commit()
            else:
                await self.session.rollback()
        finally:
            await self.session.close()

    def add(self, *events: DomainEvent) -> None:
        self._events.extend(events)

    def track(self, *aggregates: Aggregate) -> None:
        """Events the aggregates record until commit are written with the transaction."""
        self._aggregates.extend(a for a in aggregates if a not in self._aggregates)

    def after_commit(self, callback: Callable[[], None]) -> None:
        self._after_commit.append(callback)

    def pending_events(self) -> list[DomainEvent]:
        drained = [e for agg in self._aggregates for e in agg.events]
        for agg in self._aggregates:
            agg.events.clear()
        self._events.extend(drained)
        return list(self._events)

    def stamp_events(self) -> int:
        """Stamp the pending events with the current context (tenant, actor, correlation,
        causation, trace) without writing them; returns how many are pending. A consumer
        applying a batch stamps each message's events while that message's context is
        bound, and the whole batch's events are written once, at commit."""
        events = self.pending_events()
        ctx, traceparent = context.current(), current_traceparent()
        for event in events:
            if not event.stamped:
                _stamp(event, ctx, traceparent)
        return len(events)

    def discard_events(self, keep: int = 0) -> None:
        """Forget pending events after the first `keep` (those of a rolled-back savepoint)."""
        for agg in self._aggregates:
            agg.events.clear()
        del self._events[keep:]

    async def flush_events(self) -> None:
        self.stamp_events()
        events, self._events = self._events, []
        if events:
            await write_events(self.session, events)

    async def _commit(self) -> None:
        await self.flush_events()
        await self.session.commit()
        for callback in self._after_commit:
            callback()


def _stamp(event: DomainEvent, ctx: context.RequestContext, traceparent: str | None) -> None:
    event.tenant_id = event.tenant_id or ctx.tenant_id
    event.actor = event.actor or ctx.actor or "system:unknown"
    event.correlation_id = event.correlation_id or ctx.correlation_id
    event.causation_id = event.causation_id or ctx.causation_id
    event.traceparent = event.traceparent or traceparent
    event.stamped = True


async def write_events(session: AsyncSession, events: Iterable[DomainEvent]) -> None:
    events = list(events)
    ctx, traceparent = context.current(), current_traceparent()
    for event in events:
        if not event.stamped:
            _stamp(event, ctx, traceparent)
    # Per-aggregate order: the seq an event gets must follow commit order for the same
    # aggregate. A transaction-scoped advisory lock per aggregate (taken in a stable
    # order, so two writers cannot deadlock on it) serialises writers of one aggregate.
    keys = sorted({_lock_key(e) for e in events})
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest(CAST(:keys AS text[])) AS k"),
        {"keys": keys},
    )
    await session.execute(
        _INSERT_EVENTS,
        {
            "ids": [str(e.id) for e in events],
            "tenants": [e.tenant_id for e in events],
            "agg_types": [e.aggregate_type for e in events],
            "agg_ids": [e.aggregate_id for e in events],
            "types": [e.type for e in events],
            "versions": [schema_version(e.type) for e in events],
            "payloads": [orjson.dumps(e.payload).decode() for e in events],
            "actors": [e.actor for e in events],
            "reasons": [e.reason for e in events],
            "correlations": [e.correlation_id for e in events],
            "causations": [e.causation_id for e in events],
            "traceparents": [e.traceparent for e in events],
            "times": [e.occurred_at for e in events],
        },
    )


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError):
        orig = getattr(exc, "orig", None)
        sqlstate = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)
        return sqlstate in RETRYABLE_SQLSTATES
    return False


async def run_in_transaction(
    sessionmaker: async_sessionmaker[AsyncSession],
    use_case: Callable[[UnitOfWork], Awaitable[T]],
    *,
    attempts: int = 8,
) -> T:
    """Run `use_case` in a fresh unit of work, retrying the whole of it when PostgreSQL
    reports a serialization failure or deadlock (safe: nothing was committed)."""
    for attempt in range(1, attempts + 1):
        try:
            async with UnitOfWork(sessionmaker) as uow:
                return await use_case(uow)
        except DBAPIError as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
            await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
    raise AssertionError("unreachable")
