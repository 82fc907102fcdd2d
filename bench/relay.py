"""Relay benchmark: commit→broker-ack latency on an idle system, and sustained throughput
as a ratio to a raw aiokafka producer sending the same messages in the same run.

    .venv/bin/python bench/relay.py [--events 50000] [--samples 500]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from aiokafka import AIOKafkaProducer

from bench._platform import embedded_pair, kit_database, percentile
from shared.db import make_engine, make_sessionmaker, plain_url
from shared.events import DomainEvent
from shared.kafka import ensure_topics
from shared.relay import Relay
from shared.uow import run_in_transaction

PAYLOAD = {"payment_id": "8d1f2c3a-0000-4000-8000-000000000000", "amount": 125000, "currency": "EUR",
           "debit_account_id": "acc_0000000000000000", "reference": "invoice 2026-11-25"}


class TimedRelay(Relay):
    """Notes when each event's broker ack arrived (bench instrumentation only)."""

    acked_at: dict[str, float] = {}

    async def _send(self, producer, events):
        acked, error = await super()._send(producer, events)
        now = time.perf_counter()
        for event in acked:
            self.acked_at.setdefault(str(event.id), now)
        return acked, error


async def latency(db_url: str, bootstrap: str, service: str, samples: int) -> list[float]:
    engine = make_engine(db_url, pool_size=2)
    sessionmaker = make_sessionmaker(engine)
    relay = TimedRelay(service=service, database_url=db_url, bootstrap=bootstrap, poll_interval_s=5)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    await relay.active.wait()
    await asyncio.sleep(1)
    results = []
    for i in range(samples):
        event = DomainEvent("payment.created.v1", "payment", str(uuid.uuid4()), PAYLOAD, tenant_id="t1", actor="user:b")

        async def use_case(uow, event=event):
            uow.add(event)

        await run_in_transaction(sessionmaker, use_case)
        committed = time.perf_counter()
        while str(event.id) not in relay.acked_at:
            await asyncio.sleep(0.0002)
        results.append(relay.acked_at[str(event.id)] - committed)
        await asyncio.sleep(0.01)  # idle system: one event at a time
    stop.set()
    await task
    await engine.dispose()
    return results


async def throughput(db_url: str, owner_url: str, bootstrap: str, service: str, events: int) -> float:
    import asyncpg

    conn = await asyncpg.connect(plain_url(owner_url))
    await conn.execute(
        """INSERT INTO events (id, tenant_id, aggregate_type, aggregate_id, type, schema_version, payload, actor)
           SELECT gen_random_uuid(), 't1', 'payment', (g % 1000)::text, 'payment.created.v1', 1, $1::jsonb, 'user:b'
           FROM generate_series(1, $2) g""",
        __import__("orjson").dumps(PAYLOAD).decode(), events,
    )
    relay = Relay(service=service, database_url=db_url, bootstrap=bootstrap, batch_size=1000)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(relay.run(stop))
    while await conn.fetchval("SELECT count(*) FROM events WHERE published_at IS NULL"):
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    await conn.close()
    return events / elapsed


async def raw_producer(bootstrap: str, topic: str, events: int) -> float:
    import orjson

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1, max_batch_size=256 * 1024)
    await producer.start()
    value = orjson.dumps(PAYLOAD)
    headers = [("ce_specversion", b"1.0"), ("ce_id", b"x" * 36), ("ce_type", b"payment.created.v1"),
               ("ce_source", b"/clearhouse/bench"), ("ce_subject", b"123"), ("traceparent", b"0" * 55)]
    started = time.perf_counter()
    futures = [await producer.send(topic, value, key=str(i % 1000).encode(), headers=headers) for i in range(events)]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    await producer.stop()
    return events / elapsed


async def main(events: int, samples: int) -> None:
    with embedded_pair() as (pg, broker):
        db = await kit_database(pg.url(), "bench_relay")
        await ensure_topics(broker.bootstrap, ["lat.events", "tp.events", "raw.events"])
        lat = await latency(db.app_url, broker.bootstrap, "lat", samples)
        db2 = await kit_database(pg.url(), "bench_relay_tp")
        relay_eps = await throughput(db2.app_url, db2.owner_url, broker.bootstrap, "tp", events)
        raw_eps = await raw_producer(broker.bootstrap, "raw.events", events)
    ms = [x * 1000 for x in lat]
    print(f"relay latency commit→ack ({samples} events, idle): p50 {percentile(ms, 50):.2f} ms, "
          f"p99 {percentile(ms, 99):.2f} ms, max {max(ms):.2f} ms")
    print(f"relay throughput ({events} events backlog): {relay_eps:,.0f} events/s")
    print(f"raw aiokafka producer, same messages: {raw_eps:,.0f} msgs/s")
    print(f"ratio relay/raw: {relay_eps / raw_eps:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.samples))
