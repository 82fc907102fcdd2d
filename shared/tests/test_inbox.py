"""The inbox against real PostgreSQL and the real broker: effects applied once whatever
is redelivered, poison messages parked in the DLQ without blocking the rest."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import datetime, timezone

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import text

from shared.envelope import StoredEvent, encode
from shared.events import DomainEvent
from shared.inbox import Consumer
from shared.tests.conftest import eventually, read_topic


def stored(event_type: str, aggregate_id: str, payload: dict, *, event_id: uuid.UUID | None = None) -> StoredEvent:
    return StoredEvent(seq=1, id=event_id or uuid.uuid4(), tenant_id="t1", aggregate_type="counter",
                       aggregate_id=aggregate_id, type=event_type, schema_version=1, payload=payload,
                       actor="user:test", reason=None, correlation_id="corr-1", causation_id=None,
                       traceparent=None, occurred_at=datetime.now(timezone.utc))


async def produce(platform, topic: str, *events: StoredEvent, raw: list[tuple[bytes, list]] = ()) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=platform.bootstrap)
    await producer.start()
    try:
        for event in events:
            key, value, headers = encode(event, source="/clearhouse/test", traceparent=None)
            await producer.send_and_wait(topic, value, key=key, headers=headers)
        for value, headers in raw:
            await producer.send_and_wait(topic, value, key=b"raw", headers=headers)
    finally:
        await producer.stop()


async def apply_increment(uow, event) -> None:
    if event.data.get("poison"):
        raise ValueError("this message can never be applied")
    await uow.session.execute(
        text("INSERT INTO counters (id, value) VALUES (:id, :by) "
             "ON CONFLICT (id) DO UPDATE SET value = counters.value + :by"),
        {"id": f"applied:{event.subject}", "by": event.data["by"]},
    )
    uow.add(DomainEvent("counter.mirrored.v1", "mirror", event.subject, {"by": event.data["by"]}))


@contextlib.asynccontextmanager
async def consuming(kit, platform, *, name: str = "mirror", **options):
    options.setdefault("handlers", {"counter.incremented.v1": apply_increment})
    consumer = Consumer(name=f"{kit.service}-{name}", service=kit.service, topics=[kit.topic],
                        sessionmaker=kit.sessionmaker, bootstrap=platform.bootstrap, retry_backoff_s=0.01, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_duplicate_delivery_is_applied_once(kit, platform):
    event = stored("counter.incremented.v1", "d", {"by": 5})
    await produce(platform, kit.topic, event, event, event)
    await produce(platform, kit.topic, stored("counter.incremented.v1", "d", {"by": 1}))
    async with consuming(kit, platform):
        await eventually(lambda: kit.value("applied:d"), timeout=20)
        await eventually(lambda: kit.scalar("SELECT count(*) = 2 FROM processed_events"))
        await asyncio.sleep(0.5)
    assert await kit.value("applied:d") == 6
    assert await kit.scalar("SELECT count(*) FROM events WHERE type = 'counter.mirrored.v1'") == 2


async def test_handler_effects_and_its_events_commit_with_the_inbox_row(kit, platform):
    event = stored("counter.incremented.v1", "e", {"by": 2, "a_field_from_the_future": [1, 2]})
    await produce(platform, kit.topic, event)
    async with consuming(kit, platform):
        await eventually(lambda: kit.value("applied:e"))
    async with kit.sessionmaker() as session:
        row = (await session.execute(text(
            "SELECT causation_id, correlation_id, actor, tenant_id FROM events WHERE type = 'counter.mirrored.v1'"
        ))).one()
    assert row == (str(event.id), "corr-1", f"service:{kit.service}", "t1")
    assert await kit.scalar("SELECT outcome FROM processed_events WHERE event_id = :id", id=event.id) == "applied"


async def test_poison_message_goes_to_the_dlq_and_the_next_one_is_processed(kit, platform):
    poison = stored("counter.incremented.v1", "p", {"by": 1, "poison": True})
    good = stored("counter.incremented.v1", "p", {"by": 7})
    await produce(platform, kit.topic, poison, good)
    async with consuming(kit, platform, max_attempts=3):
        await eventually(lambda: kit.value("applied:p"), timeout=30)
    dead = await read_topic(platform.bootstrap, f"{kit.topic}.dlq", expect=1)
    assert [dict(r.headers)["ce_id"].decode() for r in dead] == [str(poison.id)]
    assert b"this message can never be applied" in dict(dead[0].headers)["dlq_error"]
    assert await kit.scalar("SELECT attempts FROM consumer_failures WHERE event_id = :id", id=poison.id) == 3
    assert await kit.scalar("SELECT outcome FROM processed_events WHERE event_id = :id", id=poison.id) == "dead_lettered"
    assert await kit.value("applied:p") == 7


async def test_a_message_that_is_not_a_cloudevent_is_parked_at_once(kit, platform):
    good = stored("counter.incremented.v1", "g", {"by": 3})
    await produce(platform, kit.topic, raw=[(b"not json", [("ce_type", b"x.y.v1")])])
    await produce(platform, kit.topic, good)
    async with consuming(kit, platform):
        await eventually(lambda: kit.value("applied:g"), timeout=20)
    dead = await read_topic(platform.bootstrap, f"{kit.topic}.dlq", expect=1)
    assert dead[0].value == b"not json"
    assert b"missing CloudEvents header ce_id" in dict(dead[0].headers)["dlq_error"]


async def test_unknown_event_types_are_recorded_and_skipped(kit, platform):
    unknown = stored("counter.exploded.v9", "u", {"by": 1})
    good = stored("counter.incremented.v1", "u", {"by": 1})
    await produce(platform, kit.topic, unknown, good)
    async with consuming(kit, platform):
        await eventually(lambda: kit.value("applied:u"))
    assert await kit.scalar("SELECT outcome FROM processed_events WHERE event_id = :id", id=unknown.id) == "ignored"


async def test_offsets_are_committed_after_processing(kit, platform):
    events = [stored("counter.incremented.v1", f"o{i}", {"by": 1}) for i in range(4)]
    await produce(platform, kit.topic, *events)
    async with consuming(kit, platform) as consumer:
        await eventually(lambda: kit.scalar("SELECT count(*) = 4 FROM processed_events"))
        await asyncio.sleep(0.5)
    probe = AIOKafkaConsumer(bootstrap_servers=platform.bootstrap, group_id=consumer.name, enable_auto_commit=False)
    await probe.start()
    try:
        partitions = [TopicPartition(kit.topic, p) for p in range(3)]  # the kit fixture makes 3
        committed = [await probe.committed(tp) or 0 for tp in partitions]
    finally:
        await probe.stop()
    assert sum(committed) == 4  # every processed message's offset, and no more


# ── batch handlers ───────────────────────────────────────────────────────────────────

BATCHES: list[int] = []  # sizes of the runs the batch handler was given


async def apply_increments(uow, deliveries, bound) -> None:
    """What apply_increment does for each message, in one statement for the run."""
    if any(d.event.data.get("poison") for d in deliveries):
        raise ValueError("this run holds a message that can never be applied")
    BATCHES.append(len(deliveries))
    await uow.session.execute(
        text("INSERT INTO counters (id, value) SELECT 'applied:' || id, sum(by) "
             "FROM unnest(CAST(:ids AS text[]), CAST(:bys AS int[])) AS t(id, by) GROUP BY id "
             "ON CONFLICT (id) DO UPDATE SET value = counters.value + EXCLUDED.value"),
        {"ids": [d.event.subject for d in deliveries], "bys": [d.event.data["by"] for d in deliveries]})
    for delivery in deliveries:
        with bound(delivery):
            uow.add(DomainEvent("counter.mirrored.v1", "mirror", delivery.event.subject,
                                {"by": delivery.event.data["by"]}))


async def reset_counter(uow, event) -> None:
    await uow.session.execute(text("UPDATE counters SET value = 0 WHERE id = :id"), {"id": f"applied:{event.subject}"})


def batching(**options):
    return {"batch_handlers": {"counter.incremented.v1": apply_increments},
            "handlers": {"counter.incremented.v1": apply_increment, "counter.reset.v1": reset_counter}, **options}


def consuming_in_batches(kit, platform, **options):
    return consuming(kit, platform, name="batched", **batching(**options))


async def test_a_run_of_one_type_goes_to_its_batch_handler_in_arrival_order(kit, platform):
    BATCHES.clear()
    first, second = stored("counter.incremented.v1", "b", {"by": 1}), stored("counter.incremented.v1", "b", {"by": 2})
    reset = stored("counter.reset.v1", "b", {})
    last = stored("counter.incremented.v1", "b", {"by": 5})
    await produce(platform, kit.topic, first, second, first, reset, last)  # one key: one partition, this order
    async with consuming_in_batches(kit, platform):
        await eventually(lambda: kit.scalar("SELECT count(*) = 4 FROM processed_events WHERE event_id = ANY(:ids)",
                                            ids=[first.id, second.id, reset.id, last.id]), timeout=30)
    assert await kit.value("applied:b") == 5  # the reset came between the runs, as it was sent
    assert sum(BATCHES) == 3  # every increment went through the batch handler
    async with kit.sessionmaker() as session:
        causes = (await session.execute(text(
            "SELECT causation_id FROM events WHERE type = 'counter.mirrored.v1' AND aggregate_id = 'b' ORDER BY seq"
        ))).scalars().all()
    assert causes == [str(first.id), str(second.id), str(last.id)]  # each event stamped with its own message


async def test_a_poisoned_run_falls_back_to_one_message_at_a_time(kit, platform):
    BATCHES.clear()
    good = stored("counter.incremented.v1", "q", {"by": 4})
    poison = stored("counter.incremented.v1", "q", {"by": 1, "poison": True})
    after = stored("counter.incremented.v1", "q", {"by": 10})
    await produce(platform, kit.topic, good, poison, after)
    async with consuming_in_batches(kit, platform, max_attempts=2):
        await eventually(lambda: kit.scalar("SELECT outcome = 'dead_lettered' FROM processed_events "
                                            "WHERE event_id = :id", id=poison.id), timeout=30)
        await eventually(lambda: kit.value("applied:q"), timeout=30)
    assert await kit.value("applied:q") == 14  # the good messages, once each, by the per-message handler
    assert await kit.scalar("SELECT count(*) FROM events WHERE type = 'counter.mirrored.v1' "
                            "AND aggregate_id = 'q'") == 2


def test_a_batch_handler_needs_a_per_message_handler():
    with pytest.raises(ValueError, match="per-message handler too"):
        Consumer(name="x", service="x", topics=["x"], handlers={}, sessionmaker=None, bootstrap="x",
                 batch_handlers={"counter.incremented.v1": apply_increments})
