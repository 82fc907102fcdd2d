"""Read-model ingestion benchmark: payments and ledger events per second applied by the
reconciliation consumer (`services.reconciliation.consumers`, the kit's inbox with
deduplication on) from the real broker into the real PostgreSQL.

    .venv/bin/python -m bench.reconciliation_ingest [--payments 5000] [--duplicates 0.05] [--batch-size N]

Each payment is told as payments and the ledger tell it: created, approved, submitted,
settled, then ledger.hold.posted and ledger.transaction.posted of the same posting (6
events). A share of events is delivered twice. The events are on the broker before the
consumer starts; the clock runs from its first fetch to the last event recorded, and the
read model is checked against what was sent (each payment settled once, posted once).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid
from datetime import datetime, timezone

from aiokafka import AIOKafkaProducer
from sqlalchemy import text

from bench._platform import embedded_pair
from clearhouse.provision import provision_database
from shared import migrate
from shared.db import make_engine, make_sessionmaker
from shared.envelope import StoredEvent, encode
from shared.kafka import ensure_topics

TENANT = "bench"


def _event(seq: int, event_type: str, aggregate_type: str, aggregate_id: str, payload: dict) -> StoredEvent:
    return StoredEvent(seq=seq, id=uuid.uuid4(), tenant_id=TENANT, aggregate_type=aggregate_type,
                       aggregate_id=aggregate_id, type=event_type, schema_version=1, payload=payload,
                       actor="service:bench", reason=None, correlation_id=None, causation_id=None, traceparent=None,
                       occurred_at=datetime.now(timezone.utc))


def events_for(payment_index: int, seq: int) -> tuple[list[StoredEvent], list[StoredEvent]]:
    payment_id, transaction_id, hold_id = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    amount = 100 + payment_index
    base = {"payment_id": payment_id, "amount": amount, "currency": "EUR", "debit_account_id": "acct_1"}
    payments = [
        _event(seq, "payment.created.v1", "payment", payment_id, {**base, "reference": "r", "created_by": "u"}),
        _event(seq + 1, "payment.approved.v1", "payment", payment_id, {**base, "approval_id": "a"}),
        _event(seq + 2, "payment.submitted.v1", "payment", payment_id, {**base, "processor": "sandbox",
                                                                        "processor_payment_id": "po"}),
        _event(seq + 3, "payment.settled.v1", "payment", payment_id, {**base, "processor_payment_id": "po",
                                                                      "value_date": "2026-03-02"}),
    ]
    posted_at = "2026-03-02T12:00:00+00:00"
    ledger = [
        _event(seq + 4, "ledger.hold.posted.v1", "hold", hold_id, {
            "hold_id": hold_id, "payment_id": payment_id, "amount": amount, "currency": "EUR",
            "transaction_id": transaction_id, "posted_at": posted_at}),
        _event(seq + 5, "ledger.transaction.posted.v1", "transaction", transaction_id, {
            "transaction_id": transaction_id, "payment_id": payment_id, "posted_at": posted_at, "kind": "hold_posted",
            "entries": [{"account_id": "a", "direction": "debit", "amount": amount, "currency": "EUR"},
                        {"account_id": "b", "direction": "credit", "amount": amount, "currency": "EUR"}]}),
    ]
    return payments, ledger


async def produce(bootstrap: str, settings, payments: int, duplicates: float) -> tuple[int, int]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024)
    await producer.start()
    sent = distinct = 0
    futures = []
    rng = random.Random(7)
    for i in range(payments):
        payment_events, ledger_events = events_for(i, i * 6 + 1)
        for topic, batch in ((settings.payments_topic, payment_events), (settings.ledger_topic, ledger_events)):
            for event in batch:
                key, value, headers = encode(event, source="/bench", traceparent=None)
                copies = 2 if rng.random() < duplicates else 1
                for _ in range(copies):
                    futures.append(await producer.send(topic, value, key=key, headers=headers))
                    sent += 1
                distinct += 1
    await asyncio.gather(*futures)
    await producer.stop()
    return sent, distinct


async def main(payments: int, duplicates: float, batch_size: int | None = None) -> None:
    from services.reconciliation.api import MIGRATIONS
    from services.reconciliation.consumers import build_consumers
    from services.reconciliation.settings import Settings

    with embedded_pair() as (pg, broker):
        db = await provision_database(pg.url(), "bench_recon_ingest")
        await asyncio.to_thread(migrate.upgrade, MIGRATIONS, db.owner_url, db.app_role)
        settings = Settings(database_url=db.app_url, kafka_bootstrap_servers=broker.bootstrap, log_level="WARNING",
                            **({"consumer_batch_size": batch_size} if batch_size else {}))
        topics = [settings.payments_topic, settings.ledger_topic]
        await ensure_topics(broker.bootstrap, [*topics, *(f"{t}.dlq" for t in topics)])
        sent, distinct = await produce(broker.bootstrap, settings, payments, duplicates)
        engine = make_engine(db.app_url, pool_size=6)
        sessionmaker = make_sessionmaker(engine)
        consumers = build_consumers(settings=settings, sessionmaker=sessionmaker)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(c.run(stop)) for c in consumers]
        await asyncio.gather(*(c.ready.wait() for c in consumers))
        started = time.perf_counter()
        cpu_started = time.process_time()
        async with sessionmaker() as session:
            while (await session.execute(text("SELECT count(*) FROM processed_events"))).scalar() < distinct:
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            settled, posted, postings = (await session.execute(text(
                "SELECT (SELECT count(*) FROM rm_payments WHERE status = 'settled' AND value_date IS NOT NULL), "
                "(SELECT count(*) FROM rm_ledger_totals WHERE postings = 1), "
                "(SELECT count(*) FROM rm_ledger_postings)"))).one()
        stop.set()
        await asyncio.gather(*tasks)
        await engine.dispose()
    correct = settled == posted == postings == payments
    print(f"read-model ingestion: {sent:,} messages ({sent - distinct:,} redeliveries, {distinct:,} distinct events) "
          f"applied in {elapsed:.2f}s = {sent / elapsed:,.0f} messages/s, {distinct / elapsed:,.0f} distinct events/s "
          f"(batch size {settings.consumer_batch_size}; consumer process CPU {cpu:.1f}s; "
          f"load average {os.getloadavg()[0]:.1f})")
    print(f"read model: {settled:,} payments settled, {posted:,} posted once, {postings:,} postings for {payments:,} "
          f"payments ({'exactly once' if correct else 'WRONG'})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--payments", type=int, default=5_000)
    parser.add_argument("--duplicates", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="consumer_batch_size (default: the service's setting)")
    args = parser.parse_args()
    asyncio.run(main(args.payments, args.duplicates, args.batch_size))
