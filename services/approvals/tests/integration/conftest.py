"""Fixtures for the approvals integration tests: one freshly migrated database per test
module (the production owner/app role split), the real broker, the service's app over
ASGI, and helpers that speak as the gateway would. Each test works in its own tenant, so
tests sharing a module's database never see each other's rows."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import datetime, timezone

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import text

from services.approvals import service
from services.approvals.api import MIGRATIONS, create_app
from services.approvals.consumers import build_consumers
from services.approvals.settings import Settings
from shared import context
from shared.envelope import StoredEvent, encode
from shared.kafka import ensure_topics
from shared.testing import bearer
from shared.uow import run_in_transaction

# What the consumer process keeps between messages; tests share one, as messages do.
POLICIES = service.PolicyCache()
ALL_SCOPES = ("approvals:read", "approvals:decide", "approvals:request", "approvals:admin")


@pytest.fixture(scope="module")
async def database(platform):
    return await platform.database(MIGRATIONS, prefix="approvals")


@pytest.fixture(scope="module")
async def settings(database, platform, internal_keys):
    return Settings(database_url=database.app_url, INTERNAL_TOKEN_PUBLIC_KEY=internal_keys[1],
                    KAFKA_BOOTSTRAP_SERVERS=platform.bootstrap, db_pool_size=10)


@pytest.fixture
async def broker_settings(settings, platform):
    """The settings with a payments topic and a consumer group of this test's own: a fresh
    group never waits out the session of a member that just left, and a fresh topic holds
    only this test's messages."""
    suffix = uuid.uuid4().hex[:8]
    topic = f"payments{suffix}.events"
    await ensure_topics(platform.bootstrap, [topic, f"{topic}.dlq"], partitions=3)
    return settings.model_copy(update={"payments_topic": topic, "approvals_consumer_group": f"approvals-{suffix}"})


@pytest.fixture(scope="module")
async def app(settings):
    app = create_app(settings)
    yield app
    await app.state.engine.dispose()


@pytest.fixture
def sessionmaker(app):
    return app.state.sessionmaker


@pytest.fixture
async def http(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://approvals") as client:
        yield client


@pytest.fixture
def tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def as_(internal_keys, tenant):
    """Headers for a principal of the test's tenant: `as_("alice")`, `as_("bob", scopes=[...])`."""
    def headers(principal: str, *, scopes=ALL_SCOPES, tenant_id: str | None = None, **extra: str) -> dict[str, str]:
        return {**bearer(internal_keys[0], tenant_id=tenant_id or tenant, principal=principal, scopes=scopes),
                **extra}

    return headers


def payment_created(tenant_id: str, *, amount: int, currency: str = "EUR", maker: str | None = "maker",
                    actor: str | None = None, payment_id: str | None = None, key: str | None = None,
                    metadata: dict | None = None) -> StoredEvent:
    """A payment.created.v1 as the payments relay would publish it (docs/events.md); `key`
    (the aggregate id, hence the partition) defaults to the payment id."""
    payment_id = payment_id or str(uuid.uuid4())
    payload = {"payment_id": payment_id, "amount": amount, "currency": currency,
               "debit_account_id": str(uuid.uuid4()), "reference": "INV-1",
               "payee": {"name": "J*** D**", "iban": "DE89 **** **** **** **30 00"}, "metadata": metadata or {}}
    if maker is not None:
        payload["created_by"] = maker
    return StoredEvent(seq=1, id=uuid.uuid4(), tenant_id=tenant_id, aggregate_type="payment",
                       aggregate_id=key or payment_id, type="payment.created.v1", schema_version=1, payload=payload,
                       actor=actor or f"user:{maker}", reason=None, correlation_id=f"corr-{payment_id}",
                       causation_id=None, traceparent=None, occurred_at=datetime.now(timezone.utc))


async def open_payment(sessionmaker, settings, tenant_id: str, *, amount: int, currency: str = "EUR",
                       maker: str = "maker", payment_id: str | None = None, metadata: dict | None = None):
    """Apply a payment.created the way the consumer's handler does, without the broker (for
    tests about decisions; the consumer tests go through the broker)."""
    event = payment_created(tenant_id, amount=amount, currency=currency, maker=maker, payment_id=payment_id,
                            metadata=metadata)
    # The context the inbox binds for a consumed event.
    token = context.start(tenant_id=tenant_id, correlation_id=event.correlation_id, causation_id=str(event.id),
                          actor="service:approvals")
    try:
        return await run_in_transaction(sessionmaker, lambda uow: service.open_for_payment(
            uow=uow, tenant_id=tenant_id, actor=event.actor, payload=event.payload,
            default_expire_after_s=settings.approval_expire_after_s, policies=POLICIES))
    finally:
        context.reset(token)


async def produce(bootstrap: str, topic: str, *events: StoredEvent) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for event in events:
            key, value, headers = encode(event, source="/clearhouse/payments", traceparent=None)
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


@contextlib.asynccontextmanager
async def consuming(settings, sessionmaker):
    """The service's payment.created consumer, running against the real broker."""
    [consumer] = build_consumers(settings=settings, sessionmaker=sessionmaker)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def read_topic(bootstrap: str, topic: str, *, expect: int, timeout: float = 20.0) -> list:
    """Every record on `topic` (which must exist), waiting until at least `expect` arrived."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    records: list = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        while len(records) < expect and loop.time() < deadline:
            for part in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(part)
        for part in (await consumer.getmany(timeout_ms=300)).values():
            records.extend(part)
    finally:
        await consumer.stop()
    return records


async def eventually(predicate, *, timeout: float = 20.0, interval: float = 0.05):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)


async def scalar(sessionmaker, sql: str, **params):
    async with sessionmaker() as session:
        return (await session.execute(text(sql), params)).scalar()


async def rows(sessionmaker, sql: str, **params) -> list:
    async with sessionmaker() as session:
        return list((await session.execute(text(sql), params)).all())


async def events_of(sessionmaker, approval_id, *, types: tuple[str, ...] | None = None) -> list:
    async with sessionmaker() as session:
        rows = (await session.execute(text(
            "SELECT type, actor, reason, payload, correlation_id FROM events "
            "WHERE aggregate_type = 'approval_request' AND aggregate_id = :id ORDER BY seq"
        ), {"id": str(approval_id)})).all()
    return [row for row in rows if types is None or row.type in types]
