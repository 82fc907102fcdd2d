"""Approvals consumer benchmark: payment.created events/s through the approvals service's
own consumer (`services.approvals.consumers.build_consumers`), end to end on the real
embedded broker and PostgreSQL: inbox dedupe, policy lookup and evaluation, the request
row (with its guard trigger) and the approval event in the outbox, one transaction per
batch as in production.

The events are produced before the consumer starts, so the figure is the consumer's
sustained rate, measured from partition assignment to the last request committed. Half of
the tenants have a stored policy of their own (a row to read and rules to parse), half
run on the built-in default; amounts span auto-approval, one and two approvers.

    .venv/bin/python -m bench.approvals_consumer [--events 20000] [--tenants 20]

`--diagnose-without-outbox` is a diagnostic, not a configuration: the handler's events are
discarded instead of written, which isolates what the kit's per-message outbox flush costs
(a state no real run may produce).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from datetime import datetime, timezone

import os

import psutil
from aiokafka import AIOKafkaProducer
from sqlalchemy import text

from bench._platform import embedded_pair
from clearhouse.provision import provision_database
from services.approvals import domain, service
from services.approvals.api import MIGRATIONS
from services.approvals.consumers import PAYMENT_CREATED, build_consumers
from services.approvals.settings import Settings
from shared import context, migrate
from shared.db import make_engine, make_sessionmaker
from shared.envelope import StoredEvent, encode
from shared.kafka import ensure_topics
from shared.uow import run_in_transaction

TOPIC = "payments.events"
CURRENCIES = ["EUR", "EUR", "EUR", "USD", "GBP", "JPY", "CHF"]


def payment_created(tenant: str) -> StoredEvent:
    payment_id = str(uuid.uuid4())
    currency = random.choice(CURRENCIES)
    # Log-uniform from 1.00 to 100,000.00 in major units: most auto, some one or two approvers.
    amount = max(1, int(10 ** random.uniform(2, 7)) // (100 if currency == "JPY" else 1))
    payload = {"payment_id": payment_id, "amount": amount, "currency": currency,
               "debit_account_id": str(uuid.uuid4()), "reference": "bench",
               "payee": {"name": "J*** D**", "iban": "DE89 **** **** **** **30 00"},
               "created_by": f"maker-{random.randrange(50)}", "metadata": {"category": random.choice(["ops", "fx"])}}
    return StoredEvent(seq=0, id=uuid.uuid4(), tenant_id=tenant, aggregate_type="payment", aggregate_id=payment_id,
                       type="payment.created.v1", schema_version=1, payload=payload,
                       actor=f"user:{payload['created_by']}", reason=None, correlation_id=str(uuid.uuid4()),
                       causation_id=None, traceparent=None, occurred_at=datetime.now(timezone.utc))


async def produce(bootstrap: str, events: int, tenants: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = []
        for _ in range(events):
            key, value, headers = encode(payment_created(random.choice(tenants)), source="/clearhouse/payments",
                                         traceparent=None)
            futures.append(await producer.send(TOPIC, value, key=key, headers=headers))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def store_policies(sessionmaker, tenants: list[str]) -> None:
    rules = [domain.Rule("payroll_auto", 0, domain.Conditions(metadata={"category": "payroll"})),
             domain.Rule("two_from_5000", 2, domain.Conditions(
                 amount_at_least=domain.AmountThreshold(minor_units={"JPY": 500_000}, whole_major_units=5_000))),
             domain.Rule("one_from_500", 1, domain.Conditions(
                 amount_at_least=domain.AmountThreshold(whole_major_units=500))),
             domain.Rule("auto", 0)]
    token = context.start(actor="user:bench-admin")
    try:
        for tenant in tenants:
            await run_in_transaction(sessionmaker, lambda uow, tenant=tenant: service.change_policy(
                uow=uow, tenant_id=tenant, subject_type="payment", changed_by="bench-admin", rules=rules,
                expire_after_seconds=None, escalate_after_seconds=None, reason="bench", expected_version=None))
    finally:
        context.reset(token)


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def postgres_processes(pg) -> list[psutil.Process]:
    postmaster = psutil.Process(int((pg.data_dir / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children()]


class _DiscardingEvents:
    """A unit of work that drops the events handed to it (diagnostic only)."""

    def __init__(self, uow) -> None:
        self._uow = uow

    def __getattr__(self, name: str):
        return getattr(self._uow, name)

    def add(self, *events) -> None:
        pass


def without_outbox(handler):
    async def handle(uow, event) -> None:
        await handler(_DiscardingEvents(uow), event)

    return handle


async def main(events: int, tenant_count: int, diagnose_without_outbox: bool = False) -> None:
    random.seed(11)
    tenants = [f"tenant-{i}" for i in range(tenant_count)]
    with embedded_pair() as (pg, broker):
        db = await provision_database(pg.url(), "bench_approvals")
        await asyncio.to_thread(migrate.upgrade, MIGRATIONS, db.owner_url, db.app_role)
        await ensure_topics(broker.bootstrap, [TOPIC, f"{TOPIC}.dlq"])
        settings = Settings(database_url=db.app_url, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap)
        # The pool the consumer process uses (clearhouse.serve.run_consumers).
        engine = make_engine(db.app_url, pool_size=5, application_name="approvals-consumer")
        sessionmaker = make_sessionmaker(engine)
        await store_policies(sessionmaker, tenants[: tenant_count // 2])
        produced_at = time.perf_counter()
        await produce(broker.bootstrap, events, tenants)
        produced = time.perf_counter() - produced_at

        [consumer] = build_consumers(settings=settings, sessionmaker=sessionmaker)
        if diagnose_without_outbox:
            consumer.handlers[PAYMENT_CREATED] = without_outbox(consumer.handlers[PAYMENT_CREATED])
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(consumer.run(stop))
        await consumer.ready.wait()
        assigned = time.perf_counter()
        me, broker_process = psutil.Process(os.getpid()), psutil.Process(broker.process.pid)
        # Backends of this process's pool live as long as the pool: their CPU counts.
        database = postgres_processes(pg)
        cpu_before = (cpu_seconds([me]), cpu_seconds(database), cpu_seconds([broker_process]))
        load_before = os.getloadavg()[0]
        async with sessionmaker() as session:
            while (await session.execute(text("SELECT count(*) FROM approval_requests"))).scalar() < events:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
            finished = time.perf_counter()
            database = postgres_processes(pg)
            cpu_after = (cpu_seconds([me]), cpu_seconds(database), cpu_seconds([broker_process]))
            load_after = os.getloadavg()[0]
            statuses = dict((await session.execute(text(
                "SELECT status, count(*) FROM approval_requests GROUP BY status"))).all())
            logged = (await session.execute(text("SELECT count(*) FROM events WHERE aggregate_type = "
                                                 "'approval_request'"))).scalar()
        stop.set()
        await task
        await engine.dispose()

    elapsed = finished - assigned
    print(f"produced {events} payment.created in {produced:.1f}s; consumer joined in {assigned - started:.1f}s")
    print(f"approvals consumer: {events} payment.created -> {events} requests "
          f"({statuses.get('granted', 0)} auto-granted, {statuses.get('pending', 0)} pending; {logged} events) "
          f"in {elapsed:.2f}s = {events / elapsed:,.0f} events/s "
          f"(including the group join: {events / (finished - started):,.0f} events/s)")
    consumer_cpu, database_cpu, broker_cpu = (after - before for after, before in zip(cpu_after, cpu_before))
    per_event = [1e6 * cpu / events for cpu in (consumer_cpu, database_cpu, broker_cpu)]
    print(f"CPU per event: consumer {per_event[0]:.0f} us, PostgreSQL {per_event[1]:.0f} us, "
          f"broker {per_event[2]:.0f} us (this process had {consumer_cpu / elapsed:.0%} of a core); "
          f"machine: {psutil.cpu_count()} cores, load average {load_before:.1f} -> {load_after:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--diagnose-without-outbox", action="store_true",
                        help="diagnostic: discard the handler's events to measure the outbox flush's share")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.tenants, args.diagnose_without_outbox))
