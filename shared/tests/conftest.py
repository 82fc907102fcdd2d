"""Fixtures for the kit's integration tests: a freshly migrated database per test and a
unique service name, so every test has its own topics and nothing leaks between tests."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import text

from shared.db import make_engine, make_sessionmaker
from shared.events import DomainEvent
from shared.kafka import ensure_topics
from shared.testing import eventually  # noqa: F401 (the kit tests import it from here)
from shared.uow import run_in_transaction

KIT_MIGRATIONS = Path(__file__).parent / "kit_migrations"


class KitDb:
    def __init__(self, db, engine, sessionmaker, service: str):
        self.db, self.engine, self.sessionmaker, self.service = db, engine, sessionmaker, service

    @property
    def topic(self) -> str:
        return f"{self.service}.events"

    async def increment(self, counter: str, by: int = 1, *, fail: bool = False) -> DomainEvent:
        """A use case: bump a counter and record the event, in one transaction."""
        async def use_case(uow):
            row = await uow.session.execute(
                text("INSERT INTO counters (id, value) VALUES (:id, :by) ON CONFLICT (id) "
                     "DO UPDATE SET value = counters.value + :by RETURNING value"),
                {"id": counter, "by": by},
            )
            value = row.scalar_one()
            event = DomainEvent("counter.incremented.v1", "counter", counter, {"by": by, "value": value},
                                tenant_id="t1", actor="user:test")
            uow.add(event)
            if fail:
                raise RuntimeError("use case failed after recording its event")
            return event

        return await run_in_transaction(self.sessionmaker, use_case)

    async def value(self, counter: str) -> int | None:
        async with self.sessionmaker() as session:
            return (await session.execute(text("SELECT value FROM counters WHERE id = :id"), {"id": counter})).scalar()

    async def scalar(self, sql: str, **params):
        async with self.sessionmaker() as session:
            return (await session.execute(text(sql), params)).scalar()


@pytest.fixture
async def kit(platform):
    db = await platform.database(KIT_MIGRATIONS, prefix="kit")
    engine = make_engine(db.app_url, pool_size=10)
    service = f"kit{uuid.uuid4().hex[:8]}"
    await ensure_topics(platform.bootstrap, [f"{service}.events", f"{service}.events.dlq"], partitions=3)
    yield KitDb(db, engine, make_sessionmaker(engine), service)
    await engine.dispose()


async def read_topic(bootstrap: str, topic: str, *, expect: int, timeout: float = 20.0) -> list:
    """Every record on `topic` from the beginning, waiting until at least `expect` arrived."""
    # No consumer group: assigning the partitions directly skips the group join (seconds).
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    records: list = []
    try:
        await consumer.topics()  # fetches metadata
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        deadline = asyncio.get_running_loop().time() + timeout
        while len(records) < expect and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for part in batch.values():
                records.extend(part)
        # Anything beyond `expect` that is already there (duplicates) is part of the answer.
        batch = await consumer.getmany(timeout_ms=300)
        for part in batch.values():
            records.extend(part)
    finally:
        await consumer.stop()
    return records

