"""The inbox: an idempotent Kafka consumer that applies each event at most once.

For every message the handler's effects, the events it records and the row
`processed_events(consumer, event_id)` commit in one transaction, so a redelivered event
finds its row and is skipped. Offsets are committed only after that transaction.

A batch of messages from one partition is applied in one transaction with one bulk
inbox insert. If a handler raises, that transaction rolls back and the batch is applied
again with one savepoint per message: the messages before the bad one commit, and the bad
one is retried alone with backoff; after `max_attempts` it goes to `<topic>.dlq` (with
the error in headers), is recorded as dead-lettered and the partition moves on. An outage
(database or broker unreachable) is never charged to a message. A message that is not a CloudEvent at all goes to the DLQ at once.
Unknown event types are recorded as ignored; unknown fields are the handler's to ignore.

A type may also have a batch handler, for the optimistic path only: a run of consecutive
messages of that type is handed over at once, so the handler can write them with one
statement instead of one round trip each. It must do exactly what the per-message
handler would do for each message, and record each message's events inside
`bound(delivery)` (which binds that message's context and process span, and stamps the
events with them). The careful path always uses the per-message handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from opentelemetry.trace import SpanKind
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import context, metrics
from shared.envelope import EnvelopeError, InboundEvent, decode
from shared.kafka import make_consumer, make_producer
from shared.telemetry import kafka_span
from shared.uow import UnitOfWork, is_retryable

log = logging.getLogger(__name__)

Handler = Callable[[UnitOfWork, InboundEvent], Awaitable[None]]


@dataclass(frozen=True)
class Delivery:
    record: ConsumerRecord
    event: InboundEvent


Bound = Callable[[Delivery], AbstractContextManager[None]]
BatchHandler = Callable[[UnitOfWork, list[Delivery], Bound], Awaitable[None]]

_ALREADY_PROCESSED = text(
    "SELECT event_id::text FROM processed_events WHERE consumer = :consumer AND event_id = ANY(CAST(:ids AS uuid[]))"
)
_MARK_PROCESSED = text(
    "INSERT INTO processed_events (consumer, event_id, event_type, outcome) VALUES (:consumer, :id, :type, :outcome) "
    "ON CONFLICT DO NOTHING RETURNING 1"
)
_MARK_MANY = text(
    """
    INSERT INTO processed_events (consumer, event_id, event_type, outcome)
    SELECT :consumer, * FROM unnest(CAST(:ids AS uuid[]), CAST(:types AS text[]), CAST(:outcomes AS text[]))
    ON CONFLICT DO NOTHING RETURNING 1
    """
)
_RECORD_FAILURE = text(
    """
    INSERT INTO consumer_failures (consumer, event_id, topic, attempts, last_error)
    VALUES (:consumer, :id, :topic, 1, :error)
    ON CONFLICT (consumer, event_id) DO UPDATE
        SET attempts = consumer_failures.attempts + 1, last_error = EXCLUDED.last_error, updated_at = clock_timestamp()
    RETURNING attempts
    """
)


class _RetryCarefully(Exception):
    """The optimistic batch cannot commit as a whole; apply it message by message."""


@dataclass
class _Failure:
    index: int
    error: BaseException
    permanent: bool  # undecodable: retrying cannot help


class Consumer:
    def __init__(
        self,
        *,
        name: str,
        service: str,
        topics: list[str],
        handlers: dict[str, Handler],
        sessionmaker: async_sessionmaker[AsyncSession],
        batch_handlers: dict[str, BatchHandler] | None = None,
        bootstrap: str,
        max_attempts: int = 5,
        batch_size: int = 200,
        retry_backoff_s: float = 0.2,
    ) -> None:
        self.name = name
        self.service = service
        self.topics = topics
        self.handlers = handlers
        missing = set(batch_handlers or ()) - set(handlers)
        if missing:
            raise ValueError(f"batch handlers need a per-message handler too (the careful path): {sorted(missing)}")
        self.batch_handlers = batch_handlers or {}
        self._sessionmaker = sessionmaker
        self._bootstrap = bootstrap
        self._max_attempts = max_attempts
        self._batch_size = batch_size
        self._retry_backoff_s = retry_backoff_s
        self._kafka = None
        self._dlq_producer = None
        self.ready = asyncio.Event()  # set once partitions are assigned (tests, health)

    async def run(self, stop: asyncio.Event) -> None:
        self._kafka = make_consumer(self._bootstrap, *self.topics, group_id=self.name, max_poll_records=self._batch_size)
        self._dlq_producer = make_producer(self._bootstrap, client_id=f"{self.name}-dlq")
        await self._kafka.start()
        await self._dlq_producer.start()
        try:
            while not stop.is_set():
                try:
                    batches = await self._kafka.getmany(timeout_ms=250, max_records=self._batch_size)
                except KafkaError as exc:
                    log.warning("consumer %s: fetch failed: %s", self.name, exc)
                    await asyncio.sleep(0.5)
                    continue
                if self._kafka.assignment():
                    self.ready.set()
                # Partitions are independent streams: apply them concurrently, each in its
                # own transaction, so their database round trips overlap.
                await asyncio.gather(*(self._process_or_rewind(tp, records) for tp, records in batches.items()))
                await self._report_lag()
        finally:
            await self._kafka.stop()
            await self._dlq_producer.stop()

    # ── one partition's batch ──────────────────────────────────────────────────
    async def _process_or_rewind(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        try:
            await self._process_partition(tp, records)
        except Exception as exc:
            if not is_transient(exc):
                raise
            # The database or broker is away: nothing of this batch beyond the committed
            # offset counts; fetch it again once they are back.
            log.warning("consumer %s: %s; will re-read %s", self.name, exc, tp)
            committed = await self._kafka.committed(tp)
            self._kafka.seek(tp, committed if committed is not None else records[0].offset)
            await asyncio.sleep(1.0)

    async def _process_partition(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        pending = records
        while pending:
            applied, failure = await self._apply(pending)
            if applied:
                await self._commit_offset(tp, pending[applied - 1].offset)
            if failure is None:
                return
            record = pending[failure.index]
            if failure.permanent or await self._attempts(record, failure.error) >= self._max_attempts:
                await self._dead_letter(record, failure.error)
                await self._commit_offset(tp, record.offset)
                pending = pending[failure.index + 1:]
            else:
                metrics.CONSUMER_FAILURES.labels(self.name, tp.topic).inc()
                await asyncio.sleep(self._retry_backoff_s)
                pending = pending[failure.index:]

    async def _apply(self, records: list[ConsumerRecord]) -> tuple[int, _Failure | None]:
        """Apply records in order; stop at the first failure. Returns how many records (a
        prefix) are now durably handled, and the failure if any.

        Fast path: the whole batch in one transaction with one bulk inbox insert. If any
        handler raises (or another consumer claimed an event meanwhile), that transaction
        is rolled back and the batch is applied again carefully, one savepoint per
        message, so the good messages before the bad one still commit."""
        decoded: list[InboundEvent] = []
        for index, record in enumerate(records):
            try:
                decoded.append(decode(record.value, record.headers))
            except EnvelopeError as exc:
                if index == 0:
                    return 0, _Failure(0, exc, permanent=True)
                break  # apply the good prefix first; the bad one comes back as index 0
        try:
            outcomes = await self._apply_batch(records, decoded)
        except _RetryCarefully:
            return await self._apply_carefully(records, decoded)
        self._count(records, outcomes)
        return len(decoded), None

    async def _apply_batch(self, records: list[ConsumerRecord], decoded: list[InboundEvent]) -> list[str]:
        outcomes: list[str] = []
        async with UnitOfWork(self._sessionmaker) as uow:
            seen = await self._already_processed(uow.session, decoded)
            fresh: list[InboundEvent] = []
            run: list[Delivery] = []  # consecutive messages of one batch-handled type

            async def flush_run() -> None:
                if run:
                    deliveries = list(run)
                    run.clear()
                    await self.batch_handlers[deliveries[0].event.type](
                        uow, deliveries, lambda delivery: self._bound(uow, delivery))

            for index, event in enumerate(decoded):
                if str(event.id) in seen:
                    outcomes.append("duplicate")
                    continue
                try:
                    if event.type in self.batch_handlers:
                        if run and run[0].event.type != event.type:
                            await flush_run()
                        run.append(Delivery(records[index], event))
                        outcomes.append("applied")
                    else:
                        await flush_run()  # arrival order holds across handlers
                        outcomes.append(await self._handle(uow, records[index], event))
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    raise _RetryCarefully from exc
                seen.add(str(event.id))
                fresh.append(event)
            try:
                await flush_run()
            except Exception as exc:
                if is_transient(exc):
                    raise
                raise _RetryCarefully from exc
            if fresh:
                inserted = await uow.session.execute(_MARK_MANY, {
                    "consumer": self.name, "ids": [str(e.id) for e in fresh], "types": [e.type for e in fresh],
                    "outcomes": [o for o in outcomes if o != "duplicate"],
                })
                if len(inserted.all()) != len(fresh):
                    raise _RetryCarefully  # someone else applied one of them: roll back, redo with care
        return outcomes

    async def _apply_carefully(self, records, decoded) -> tuple[int, _Failure | None]:
        failure, outcomes = None, []
        async with UnitOfWork(self._sessionmaker) as uow:
            seen = await self._already_processed(uow.session, decoded)
            for index, event in enumerate(decoded):
                if str(event.id) in seen:
                    outcomes.append("duplicate")
                    continue
                savepoint = await uow.session.begin_nested()
                events_before = uow.stamp_events()
                try:
                    inserted = await uow.session.execute(_MARK_PROCESSED, {
                        "consumer": self.name, "id": event.id, "type": event.type,
                        "outcome": "applied" if event.type in self.handlers else "ignored"})
                    outcome = await self._handle(uow, records[index], event) if inserted.first() else "duplicate"
                    await savepoint.commit()
                except Exception as exc:
                    await savepoint.rollback()
                    uow.discard_events(keep=events_before)
                    if is_transient(exc):
                        raise  # an outage is not the message's fault: never count it toward the DLQ
                    log.warning("consumer %s: %s %s failed: %s", self.name, event.type, event.id, exc,
                                extra={"event_id": str(event.id), "error": type(exc).__name__})
                    failure = _Failure(index, exc, permanent=False)
                    break
                outcomes.append(outcome)
                seen.add(str(event.id))
        self._count(records, outcomes)
        return (failure.index if failure else len(decoded)), failure

    async def _handle(self, uow: UnitOfWork, record: ConsumerRecord, event: InboundEvent) -> str:
        """Run the event's handler with its context bound; the events it records are
        stamped with that context (causation, correlation, tenant, trace) and written
        with the batch at commit."""
        handler = self.handlers.get(event.type)
        if handler is None:
            return "ignored"
        with self._bound(uow, Delivery(record, event)):
            await handler(uow, event)
        return "applied"

    @contextmanager
    def _bound(self, uow: UnitOfWork, delivery: Delivery) -> Iterator[None]:
        """The message's context and process span; the events recorded inside are
        stamped now, while they are current."""
        record, event = delivery.record, delivery.event
        token = context.bind(
            tenant_id=event.tenant_id, correlation_id=event.correlation_id or str(event.id),
            causation_id=str(event.id), actor=f"service:{self.service}", principal=None,
        )
        try:
            with kafka_span(f"{record.topic} process", kind=SpanKind.CONSUMER, parent_traceparent=event.traceparent,
                            topic=record.topic, message_id=str(event.id),
                            attributes={"messaging.consumer.group.name": self.name,
                                        "clearhouse.event_type": event.type}):
                yield
                uow.stamp_events()  # written once for the whole batch, at commit
        finally:
            context.reset(token)

    def _count(self, records: list[ConsumerRecord], outcomes: list[str]) -> None:
        for record, outcome in zip(records, outcomes):
            metrics.CONSUMER_PROCESSED.labels(self.name, record.topic, outcome).inc()

    async def _already_processed(self, session: AsyncSession, events: list[InboundEvent]) -> set[str]:
        if not events:
            return set()
        rows = await session.execute(_ALREADY_PROCESSED, {"consumer": self.name, "ids": [str(e.id) for e in events]})
        return {row[0] for row in rows}

    # ── failures ──────────────────────────────────────────────────────────────
    async def _attempts(self, record: ConsumerRecord, error: BaseException) -> int:
        event = decode(record.value, record.headers)
        async with UnitOfWork(self._sessionmaker) as uow:
            result = await uow.session.execute(
                _RECORD_FAILURE,
                {"consumer": self.name, "id": event.id, "topic": record.topic, "error": _describe(error)},
            )
            return result.scalar_one()

    async def _dead_letter(self, record: ConsumerRecord, error: BaseException) -> None:
        dlq = f"{record.topic}.dlq"
        headers = list(record.headers or ()) + [
            ("dlq_consumer", self.name.encode()),
            ("dlq_error", _describe(error).encode()),
            ("dlq_source_partition", str(record.partition).encode()),
            ("dlq_source_offset", str(record.offset).encode()),
        ]
        await self._dlq_producer.send_and_wait(dlq, record.value, key=record.key, headers=headers)
        try:
            event = decode(record.value, record.headers)
        except EnvelopeError:
            event = None
        if event is not None:
            async with UnitOfWork(self._sessionmaker) as uow:
                await uow.session.execute(
                    _MARK_PROCESSED, {"consumer": self.name, "id": event.id, "type": event.type, "outcome": "dead_lettered"}
                )
        metrics.DLQ_MESSAGES.labels(self.name, record.topic).inc()
        metrics.CONSUMER_PROCESSED.labels(self.name, record.topic, "dead_lettered").inc()
        log.error("consumer %s: message %s/%d@%d sent to %s: %s", self.name, record.topic, record.partition,
                  record.offset, dlq, _describe(error),
                  extra={"event_id": str(event.id) if event else None, "dlq_topic": dlq})

    # ── offsets and lag ─────────────────────────────────────────────────────────
    async def _commit_offset(self, tp: TopicPartition, offset: int) -> None:
        try:
            await self._kafka.commit({tp: offset + 1})
        except (CommitFailedError, KafkaError) as exc:
            # The effects are committed in the database; a redelivery is deduplicated.
            log.warning("consumer %s: offset commit for %s failed (%s); redelivery will be skipped", self.name, tp, exc)

    async def _report_lag(self) -> None:
        """Tansu's end_offsets() is unreliable: lag = highwater (from the last fetch) − position."""
        for tp in self._kafka.assignment():
            highwater = self._kafka.highwater(tp)
            if highwater is None:
                continue
            position = await self._kafka.position(tp)
            metrics.CONSUMER_LAG.labels(self.name, tp.topic, str(tp.partition)).set(max(0, highwater - position))


def is_transient(exc: BaseException) -> bool:
    """Infrastructure trouble (connection lost, server shutting down, deadlock): retry
    without charging the message an attempt."""
    if isinstance(exc, (OSError, asyncio.TimeoutError, KafkaError)):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or is_retryable(exc):
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        return sqlstate.startswith(("08", "57P")) or "connection" in type(exc.orig).__name__.lower()
    return False


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:1000]
