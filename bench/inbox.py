"""Inbox consumer benchmark: events/s applied through `shared.inbox.Consumer` with
deduplication on (every message checks and writes `processed_events`), each handler doing
one upsert, against the real broker and PostgreSQL. A share of the messages are
redeliveries, which must be skipped.

    .venv/bin/python bench/inbox.py [--events 30000] [--duplicates 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from datetime import datetime, timezone

from aiokafka import AIOKafkaProducer
from sqlalchemy import text

from bench._platform import embedded_pair, kit_database
from shared.db import make_engine, make_sessionmaker
from shared.envelope import StoredEvent, encode
from shared.inbox import Consumer
from shared.kafka import ensure_topics

TOPIC = "bench.events"


async def produce(bootstrap: str, events: int, duplicates: float) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    sent, futures, originals = 0, [], []
    for i in range(events):
        event = StoredEvent(seq=i, id=uuid.uuid4(), tenant_id="t1", aggregate_type="counter",
                            aggregate_id=f"c{i % 500}", type="counter.incremented.v1", schema_version=1,
                            payload={"by": 1}, actor="user:b", reason=None, correlation_id=None, causation_id=None,
                            traceparent=None, occurred_at=datetime.now(timezone.utc))
        originals.append(event)
        batch = [event] + ([random.choice(originals)] if random.random() < duplicates else [])
        for item in batch:
            key, value, headers = encode(item, source="/bench", traceparent=None)
            futures.append(await producer.send(TOPIC, value, key=key, headers=headers))
            sent += 1
    await asyncio.gather(*futures)
    await producer.stop()
    return sent


async def apply(uow, event) -> None:
    await uow.session.execute(
        text("INSERT INTO counters (id, value) VALUES (:id, 1) ON CONFLICT (id) DO UPDATE SET value = counters.value + 1"),
        {"id": event.subject},
    )


async def main(events: int, duplicates: float) -> None:
    random.seed(7)
    with embedded_pair() as (pg, broker):
        db = await kit_database(pg.url(), "bench_inbox")
        await ensure_topics(broker.bootstrap, [TOPIC, f"{TOPIC}.dlq"])
        sent = await produce(broker.bootstrap, events, duplicates)
        engine = make_engine(db.app_url, pool_size=4)
        sessionmaker = make_sessionmaker(engine)
        consumer = Consumer(name="bench", service="bench", topics=[TOPIC], handlers={"counter.incremented.v1": apply},
                            sessionmaker=sessionmaker, bootstrap=broker.bootstrap, batch_size=2000)
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        await consumer.ready.wait()
        async with sessionmaker() as session:
            started = time.perf_counter()
            while (await session.execute(text("SELECT count(*) FROM processed_events"))).scalar() < events:
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - started
            total = (await session.execute(text("SELECT sum(value) FROM counters"))).scalar()
        stop.set()
        await task
        await engine.dispose()
    print(f"inbox consumer: {sent} messages ({sent - events} redeliveries) applied in {elapsed:.2f}s "
          f"= {sent / elapsed:,.0f} messages/s ({events / elapsed:,.0f} distinct events/s)")
    print(f"effects applied: {total} for {events} distinct events ({'exactly once' if total == events else 'WRONG'})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--duplicates", type=float, default=0.1)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.duplicates))
