"""The outbox relay: publishes a service's committed events to `<service>.events`, in
`seq` order, keyed by aggregate id, at least once.

    commit ──NOTIFY──▶ relay (lease holder) ──fetch unpublished by seq──▶ send batch
       ▲                   │  (poll every poll_interval as a fallback)      │ acks
       └───────────────────┴──── mark published_at (acked prefix only) ◀────┘

Several replicas may run; exactly one holds the PostgreSQL advisory-lock lease per
service and publishes, on the same connection it holds the lease with, so a replica that
lost its connection also lost the right to publish. A standby polls for the lease and
takes over within `lease_retry_s` of the active one dying.

Order: a batch is fetched only after the previous one was acknowledged and marked, and
only the acknowledged prefix of a batch is marked; after a failure the relay backs off
and resends from the first unacknowledged event. Consumers deduplicate what is resent.

The relay never edits an event: it only sets `published_at`. If the broker lost its data
(the embedded broker is in-memory), the relay notices and replays the whole log into the
fresh broker. The witness is a marker topic (`<service>.events.epoch`) that only admin
requests ever touch: the events topic itself is no witness, because a fresh broker
auto-creates it the moment a consumer subscribes or a producer asks for its metadata,
and a relay that judged by it would miss the loss and strand every event the consumers
had not read yet (the fault suite found exactly that).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import Counter
from datetime import datetime, timezone

import asyncpg
from aiokafka.errors import KafkaError
from opentelemetry.trace import SpanKind

from shared import metrics
from shared.db import plain_url
from shared.envelope import StoredEvent, encode
from shared.kafka import ensure_topics, make_producer, missing_topics
from shared.schema import OUTBOX_CHANNEL
from shared.telemetry import kafka_span, traceparent_of_current_span

log = logging.getLogger(__name__)

_COLUMNS = ("seq, id, tenant_id, aggregate_type, aggregate_id, type, schema_version, payload::text AS payload, "
            "actor, reason, correlation_id, causation_id, traceparent, occurred_at")
_FETCH_UNPUBLISHED = f"SELECT {_COLUMNS} FROM events WHERE published_at IS NULL ORDER BY seq LIMIT $1"
_FETCH_RANGE = f"SELECT {_COLUMNS} FROM events WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3"
_MARK = "UPDATE events SET published_at = clock_timestamp() WHERE seq = ANY($1::bigint[]) AND published_at IS NULL"
_BACKLOG = "SELECT count(*), min(occurred_at) FROM events WHERE published_at IS NULL"


class PublishFailed(RuntimeError):
    pass


def lease_key(service: str) -> int:
    """A stable signed 64-bit advisory-lock key per service."""
    return zlib.crc32(f"clearhouse.relay.{service}".encode()) - 2**31


class Relay:
    def __init__(
        self,
        *,
        service: str,
        database_url: str,
        bootstrap: str,
        batch_size: int = 500,
        poll_interval_s: float = 1.0,
        lease_retry_s: float = 0.5,
        topic_check_interval_s: float = 5.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.service = service
        self.topic = f"{service}.events"
        self.marker_topic = marker_topic(service)
        self.source = f"/clearhouse/{service}"
        self._dsn = plain_url(database_url)
        self._bootstrap = bootstrap
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._lease_retry_s = lease_retry_s
        self._topic_check_interval_s = topic_check_interval_s
        self._max_backoff_s = max_backoff_s
        self._wake = asyncio.Event()
        self.active = asyncio.Event()  # set while this replica holds the lease (tests, health)

    # ── the long-running loop ───────────────────────────────────────────────────
    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                await self._serve_while_leased(stop)
                failures = 0
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError, PublishFailed) as exc:
                failures += 1
                metrics.RELAY_PUBLISH_ERRORS.labels(self.service).inc()
                delay = min(self._max_backoff_s, 0.1 * 2 ** min(failures, 6))
                log.warning("relay %s: %s; retrying in %.1fs", self.service, exc, delay,
                            extra={"error": type(exc).__name__})
                await _sleep_or_stop(stop, delay)
            finally:
                self.active.clear()
                metrics.RELAY_ACTIVE.labels(self.service).set(0)

    async def _serve_while_leased(self, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self._dsn, server_settings={"application_name": f"{self.service}-relay"})
        try:
            if not await self._acquire_lease(conn, stop):
                return
            self.active.set()
            metrics.RELAY_ACTIVE.labels(self.service).set(1)
            log.info("relay %s: holding the lease, publishing", self.service)
            await conn.add_listener(OUTBOX_CHANNEL, self._on_notify)
            producer = make_producer(self._bootstrap, client_id=f"{self.service}-relay")
            await producer.start()
            try:
                await self._publish_until_stopped(conn, producer, stop)
            finally:
                await producer.stop()
        finally:
            await _close(conn)

    async def _acquire_lease(self, conn: asyncpg.Connection, stop: asyncio.Event) -> bool:
        while not stop.is_set():
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", lease_key(self.service)):
                return True
            await _sleep_or_stop(stop, self._lease_retry_s)
        return False

    def _on_notify(self, *_args) -> None:
        self._wake.set()

    async def _publish_until_stopped(self, conn: asyncpg.Connection, producer, stop: asyncio.Event) -> None:
        next_topic_check = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_topic_check:
                await self._replay_if_broker_lost(conn, producer)
                next_topic_check = time.monotonic() + self._topic_check_interval_s
            self._wake.clear()
            published = await self._publish_batch(conn, producer)
            if published < self._batch_size:
                await self._refresh_backlog(conn)
                await _wait_any(self._wake, stop, timeout=self._poll_interval_s)

    async def _replay_if_broker_lost(self, conn: asyncpg.Connection, producer) -> None:
        created = await ensure_topics(self._bootstrap, [self.topic, f"{self.topic}.dlq"])
        lost = await missing_topics(self._bootstrap, [self.marker_topic])
        if not lost and self.topic not in created:
            return
        last = await conn.fetchval("SELECT max(seq) FROM events WHERE published_at IS NOT NULL")
        if last:
            log.warning("relay %s: topic %s was missing (broker lost its data); replaying seq 1..%d",
                        self.service, (lost or created)[0], last)
            count = await self._publish_range(conn, producer, 1, last)
            log.info("relay %s: replayed %d events", self.service, count)
        # The marker only once the replay is acknowledged: a replay that failed half-way
        # (a fresh broker refusing writes) must be tried again from the start, not forgotten.
        await ensure_topics(self._bootstrap, [self.marker_topic])

    # ── one batch ────────────────────────────────────────────────────────────────
    async def _publish_batch(self, conn: asyncpg.Connection, producer) -> int:
        rows = await conn.fetch(_FETCH_UNPUBLISHED, self._batch_size)
        if not rows:
            return 0
        events = [StoredEvent(**dict(row)) for row in rows]
        acked, error = await self._send(producer, events)
        if acked:
            await conn.execute(_MARK, [e.seq for e in acked])
            now = datetime.now(timezone.utc)
            latency = metrics.RELAY_LATENCY.labels(self.service)
            for event in acked:
                latency.observe(max(0.0, (now - event.occurred_at).total_seconds()))
            for event_type, count in Counter(e.type for e in acked).items():
                metrics.EVENTS_PUBLISHED.labels(self.service, event_type).inc(count)
        if error is not None:
            raise PublishFailed(f"publishing seq {events[len(acked)].seq} failed: {error!r}") from error
        return len(acked)

    async def _send(self, producer, events: list[StoredEvent]) -> tuple[list[StoredEvent], BaseException | None]:
        """Send all, wait for all acks; return the acknowledged prefix and the first error."""
        futures = []
        try:
            for event in events:
                with kafka_span(f"{self.topic} publish", kind=SpanKind.PRODUCER, parent_traceparent=event.traceparent,
                                topic=self.topic, message_id=str(event.id),
                                attributes={"clearhouse.event_type": event.type,
                                            "clearhouse.aggregate_id": event.aggregate_id}):
                    key, value, headers = encode(event, source=self.source, traceparent=traceparent_of_current_span())
                    futures.append(await producer.send(self.topic, value, key=key, headers=headers))
        except KafkaError as exc:
            results = await asyncio.gather(*futures, return_exceptions=True)
            return _acked_prefix(events, results), exc
        results = await asyncio.gather(*futures, return_exceptions=True)
        acked = _acked_prefix(events, results)
        error = next((r for r in results if isinstance(r, BaseException)), None)
        return acked, error

    async def _refresh_backlog(self, conn: asyncpg.Connection) -> None:
        count, oldest = await conn.fetchrow(_BACKLOG)
        metrics.OUTBOX_BACKLOG.labels(self.service).set(count)
        age = (datetime.now(timezone.utc) - oldest).total_seconds() if oldest else 0.0
        metrics.OUTBOX_OLDEST_AGE.labels(self.service).set(age)

    # ── replay ───────────────────────────────────────────────────────────────────
    async def replay(self, *, from_seq: int = 1, to_seq: int | None = None) -> int:
        """Publish events `from_seq..to_seq` again (disaster recovery, a broker that lost
        data). Safe at any time: consumers skip what they already applied."""
        conn = await asyncpg.connect(self._dsn, server_settings={"application_name": f"{self.service}-replay"})
        producer = make_producer(self._bootstrap, client_id=f"{self.service}-replay")
        try:
            await ensure_topics(self._bootstrap, [self.topic, f"{self.topic}.dlq"])
            await producer.start()
            last = to_seq if to_seq is not None else await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events")
            return await self._publish_range(conn, producer, from_seq, last)
        finally:
            await producer.stop()
            await _close(conn)

    async def _publish_range(self, conn: asyncpg.Connection, producer, first: int, last: int) -> int:
        sent, cursor = 0, first
        while cursor <= last:
            rows = await conn.fetch(_FETCH_RANGE, cursor, last, self._batch_size)
            if not rows:
                break
            events = [StoredEvent(**dict(row)) for row in rows]
            acked, error = await self._send(producer, events)
            if acked:
                await conn.execute(_MARK, [e.seq for e in acked])
            sent += len(acked)
            if error is not None:
                raise PublishFailed(f"replay stopped at seq {events[len(acked)].seq}: {error!r}") from error
            cursor = events[-1].seq + 1
        return sent


def marker_topic(service: str) -> str:
    """The topic whose absence tells a relay the broker lost its data. Nothing produces to
    it or subscribes to it, so no broker ever creates it by itself."""
    return f"{service}.events.epoch"


def _acked_prefix(events: list[StoredEvent], results: list) -> list[StoredEvent]:
    acked = []
    for event, result in zip(events, results):
        if isinstance(result, BaseException):
            break
        acked.append(event)
    return acked


async def _wait_any(wake: asyncio.Event, stop: asyncio.Event, *, timeout: float) -> None:
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
    except asyncio.TimeoutError:
        pass


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), timeout=2)
    except (OSError, asyncio.TimeoutError, asyncpg.InterfaceError):
        conn.terminate()
