"""What the payments integration tests share: settings for a freshly migrated database,
the gateway's headers, a real uvicorn server for an app (so webhooks travel over TCP),
events produced onto the real broker, and waiting for a condition.

Nothing here imitates the database or the broker: tests talk to the embedded
PostgreSQL and Tansu (or the external ones the environment names).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import uuid
from datetime import datetime, timezone
from typing import Any

import httpx
import uvicorn
from aiokafka import AIOKafkaProducer

from clearhouse.embedded import free_port
from services.payments.settings import Settings
from shared.envelope import StoredEvent, encode
from shared.kafka import ensure_topics
from shared.testing import bearer, eventually, rows, scalar  # noqa: F401 (the tests import them from here)

WEBHOOK_SECRET = "whsec_" + "test" * 8
PAYEE_KEYS = json.dumps({"k1": base64.b64encode(os.urandom(32)).decode()})
IBAN = "DE89370400440532013000"
PAYEE_NAME = "Jane Q Doe"
READ_WRITE = ("payments:read", "payments:write")


def make_settings(db, public_pem: str, bootstrap: str, **overrides: Any) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    values: dict[str, Any] = dict(
        database_url=db.app_url, internal_token_public_key=public_pem, kafka_bootstrap_servers=bootstrap,
        payee_keys=PAYEE_KEYS, payee_key_id="k1", sandbox_webhook_secret=WEBHOOK_SECRET,
        approvals_topic=f"approvals.events.{suffix}", ledger_topic=f"ledger.events.{suffix}",
        consumer_group=f"payments-test-{suffix}", db_pool_size=10,
        submit_backoff_base_s=0.05, submit_backoff_max_s=0.2, submit_poll_interval_s=0.05,
        janitor_interval_s=0.2, janitor_stuck_after_s=0.5, janitor_recheck_s=0.3, breaker_cooldown_s=0.5,
        processor_timeout_s=2.0, submit_lease_s=3.0, consumer_max_attempts=2,
    )
    values.update(overrides)
    return Settings(**values)


def headers(private_pem: str, *, tenant: str = "t1", principal: str = "alice",
            scopes: tuple[str, ...] = READ_WRITE, idempotency_key: str | None = None) -> dict[str, str]:
    found = bearer(private_pem, tenant_id=tenant, principal=principal, scopes=list(scopes))
    if idempotency_key:
        found["Idempotency-Key"] = idempotency_key
    return found


def payment_body(**overrides: Any) -> dict[str, Any]:
    body = {"amount": 12_500, "currency": "EUR", "debit_account_id": "acct_customer_1",
            "payee": {"name": PAYEE_NAME, "iban": IBAN}, "reference": "Invoice 42"}
    body.update(overrides)
    return body


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://payments.test")


@contextlib.asynccontextmanager
async def serving(app, *, port: int | None = None):
    """The app on a real socket; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                await task  # raises what stopped it
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def produce(bootstrap: str, topic: str, event_type: str, payload: dict[str, Any], *, tenant_id: str = "t1",
                  aggregate_type: str = "approval_request", aggregate_id: str | None = None,
                  actor: str = "system:policy", event_id: uuid.UUID | None = None) -> uuid.UUID:
    """An event as another service's relay would publish it (CloudEvents binary mode)."""
    event = StoredEvent(seq=1, id=event_id or uuid.uuid4(), tenant_id=tenant_id, aggregate_type=aggregate_type,
                        aggregate_id=aggregate_id or str(uuid.uuid4()), type=event_type, schema_version=1,
                        payload=payload, actor=actor, reason=None, correlation_id=f"corr-{uuid.uuid4().hex[:8]}",
                        causation_id=None, traceparent=None, occurred_at=datetime.now(timezone.utc))
    key, value, event_headers = encode(event, source="/clearhouse/test", traceparent=None)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=event_headers)
    finally:
        await producer.stop()
    return event.id


async def create_topics(settings: Settings) -> None:
    topics = [settings.approvals_topic, settings.ledger_topic]
    await ensure_topics(settings.kafka_bootstrap_servers, [*topics, *(f"{t}.dlq" for t in topics)], partitions=3)



# ── the whole payments side running: API on a socket, consumer, jobs, sandbox ──────


class Flow:
    """Payments (API server, consumer, jobs) and the sandbox processor, all real and
    running; the test plays approvals and the ledger by producing their events."""

    def __init__(self, *, settings: Settings, app, sessionmaker, private_pem: str, sandbox_app) -> None:
        self.settings, self.app, self.sessionmaker, self.private_pem = settings, app, sessionmaker, private_pem
        self.sandbox_app = sandbox_app

    def headers(self, **kwargs) -> dict[str, str]:
        return headers(self.private_pem, **kwargs)

    async def create(self, *, tenant: str = "t1", **overrides) -> dict:
        async with asgi_client(self.app) as http:
            response = await http.post("/v1/payments", json=payment_body(**overrides),
                                       headers=self.headers(tenant=tenant))
        assert response.status_code == 201, response.text
        return response.json()

    async def get(self, payment_id: str, *, tenant: str = "t1") -> dict:
        async with asgi_client(self.app) as http:
            return (await http.get(f"/v1/payments/{payment_id}", headers=self.headers(tenant=tenant))).json()

    async def history(self, payment_id: str, *, tenant: str = "t1") -> list[dict]:
        async with asgi_client(self.app) as http:
            response = await http.get(f"/v1/payments/{payment_id}/history", headers=self.headers(tenant=tenant))
        return response.json()["data"]

    async def grant(self, payment_id: str, *, tenant: str = "t1", approval_id: str | None = None,
                    event_id: uuid.UUID | None = None) -> uuid.UUID:
        return await produce(self.settings.kafka_bootstrap_servers, self.settings.approvals_topic,
                             "approval.granted.v1",
                             {"approval_id": approval_id or f"apr_{payment_id[:8]}", "subject_type": "payment",
                              "subject_id": payment_id, "payment_id": payment_id, "approvers": [],
                              "rule": "auto_below_threshold", "auto": True},
                             tenant_id=tenant, event_id=event_id)

    async def decline(self, payment_id: str, *, expired: bool = False, tenant: str = "t1") -> uuid.UUID:
        event_type = "approval.expired.v1" if expired else "approval.rejected.v1"
        return await produce(self.settings.kafka_bootstrap_servers, self.settings.approvals_topic, event_type,
                             {"approval_id": f"apr_{payment_id[:8]}", "subject_type": "payment",
                              "subject_id": payment_id, "payment_id": payment_id, "rejected_by": "bob",
                              "reason": "not today"},
                             tenant_id=tenant, actor="user:bob")

    async def hold(self, payment_id: str, *, amount: int = 12_500, tenant: str = "t1") -> uuid.UUID:
        return await produce(self.settings.kafka_bootstrap_servers, self.settings.ledger_topic,
                             "ledger.hold.placed.v1",
                             {"hold_id": f"hold_{payment_id[:8]}", "payment_id": payment_id,
                              "account_id": "acct_customer_1", "counter_account_id": "payouts_in_transit",
                              "amount": amount, "currency": "EUR", "expires_at": None},
                             tenant_id=tenant, aggregate_type="hold", actor="service:ledger")

    async def refuse_hold(self, payment_id: str, *, reason: str = "insufficient_funds",
                          tenant: str = "t1") -> uuid.UUID:
        return await produce(self.settings.kafka_bootstrap_servers, self.settings.ledger_topic,
                             "ledger.hold.rejected.v1",
                             {"payment_id": payment_id, "account_id": "acct_customer_1", "amount": 12_500,
                              "currency": "EUR", "reason": reason},
                             tenant_id=tenant, aggregate_type="hold", actor="service:ledger")

    async def consumed(self, *event_ids: uuid.UUID, timeout: float = 30.0) -> None:
        """Wait until the consumer has handled (applied or ignored) these events."""
        ids = [str(i) for i in event_ids]

        async def done():
            return await scalar(self.sessionmaker, "SELECT count(*) FROM processed_events "
                                                   "WHERE event_id = ANY(CAST(:ids AS uuid[]))", ids=ids) == len(ids)

        await eventually(done, timeout=timeout)

    async def wait_status(self, payment_id: str, *statuses: str, timeout: float = 20.0) -> dict:
        async def reached():
            payment = await self.get(payment_id)
            return payment if payment["status"] in statuses else None

        return await eventually(reached, timeout=timeout)

    async def approved_and_reserved(self, payment_id: str) -> None:
        await self.grant(payment_id)
        await self.wait_status(payment_id, "approved")
        await self.hold(payment_id)

    @contextlib.asynccontextmanager
    async def sandbox_running(self):
        """The sandbox on its port, its state in its SQLite file: stop it and start it
        again and it remembers its payouts, like a processor that was down a while."""
        from services.sandbox.api import create_app as create_sandbox

        self.sandbox_app = create_sandbox(self.sandbox_settings)
        async with serving(self.sandbox_app, port=self.sandbox_port):
            yield self.sandbox_app

    async def event_types(self, payment_id: str) -> list[str]:
        found = await rows(self.sessionmaker, "SELECT type FROM events WHERE aggregate_type = 'payment' "
                                              "AND aggregate_id = :id ORDER BY seq", id=payment_id)
        return [r.type for r in found]


@contextlib.asynccontextmanager
async def running_flow(db, platform, internal_keys, sessionmaker, tmp_dir, *, sandbox_options=None,
                       sandbox_up: bool = True, **overrides):
    from services.payments.api import create_app
    from services.payments.consumers import build_consumers
    from services.payments.jobs import run_jobs
    from services.sandbox.settings import Settings as SandboxSettings

    payments_port, sandbox_port = free_port(), free_port()
    settings = make_settings(db, internal_keys[1], platform.bootstrap,
                             sandbox_url=f"http://127.0.0.1:{sandbox_port}", **overrides)
    sandbox_settings = SandboxSettings(
        webhook_url=f"http://127.0.0.1:{payments_port}/v1/payments/webhooks/sandbox",
        webhook_secret=WEBHOOK_SECRET, processing_delay_s=0.05, settle_delay_s=0.1, refund_delay_s=0.1,
        stall_s=4.0, db_path=str(tmp_dir / f"sandbox-{uuid.uuid4().hex[:6]}.sqlite3"),
        **(sandbox_options or {}))
    await create_topics(settings)
    app = create_app(settings)
    stop = asyncio.Event()
    consumers = build_consumers(settings=settings, sessionmaker=sessionmaker)
    flow = Flow(settings=settings, app=app, sessionmaker=sessionmaker, private_pem=internal_keys[0], sandbox_app=None)
    flow.sandbox_settings, flow.sandbox_port, flow.payments_port = sandbox_settings, sandbox_port, payments_port
    async with serving(app, port=payments_port), contextlib.AsyncExitStack() as sandbox:
        if sandbox_up:
            await sandbox.enter_async_context(flow.sandbox_running())
        tasks = [asyncio.create_task(c.run(stop)) for c in consumers]
        tasks.append(asyncio.create_task(run_jobs(settings, sessionmaker, stop)))
        try:
            await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in consumers)), 30)
            yield flow
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
