"""What the reconciliation integration tests share: settings on a freshly migrated
database, the gateway's headers, payments and ledger events produced onto the real broker
(as their relays would publish them), statement files built from those payments, and the
run worker driven one run at a time.

Nothing here imitates the database or the broker.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from services.reconciliation import jobs
from services.reconciliation.settings import Settings
from shared.envelope import StoredEvent, encode
from shared.kafka import ensure_topics
from shared.money import format_minor
from shared.testing import bearer, eventually, rows, scalar  # noqa: F401 (the tests import them from here)

READ_WRITE = ("reconciliation:read", "reconciliation:write")
_SEQ = itertools.count(1)


def make_settings(db, public_pem: str, bootstrap: str, **overrides: Any) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    values: dict[str, Any] = dict(
        database_url=db.app_url, internal_token_public_key=public_pem, kafka_bootstrap_servers=bootstrap,
        payments_topic=f"payments.events.{suffix}", ledger_topic=f"ledger.events.{suffix}",
        read_model_consumer=f"reconciliation-test-{suffix}", db_pool_size=5, consumer_max_attempts=2,
        run_poll_interval_s=0.05, statement_max_bytes=5 * 1024 * 1024)
    values.update(overrides)
    return Settings(**values)


def headers(private_pem: str, *, tenant: str, principal: str = "alice", scopes: tuple[str, ...] = READ_WRITE,
            idempotency_key: str | None = None, content_type: str | None = None) -> dict[str, str]:
    found = bearer(private_pem, tenant_id=tenant, principal=principal, scopes=list(scopes))
    if idempotency_key:
        found["Idempotency-Key"] = idempotency_key
    if content_type:
        found["Content-Type"] = content_type
    return found


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://reconciliation.test",
                             timeout=60)


async def create_topics(settings: Settings) -> None:
    topics = [settings.payments_topic, settings.ledger_topic]
    await ensure_topics(settings.kafka_bootstrap_servers, [*topics, *(f"{t}.dlq" for t in topics)], partitions=3)


def stored_event(event_type: str, payload: dict[str, Any], *, tenant_id: str, aggregate_type: str,
                 aggregate_id: str, seq: int | None = None, event_id: uuid.UUID | None = None) -> StoredEvent:
    return StoredEvent(seq=seq if seq is not None else next(_SEQ), id=event_id or uuid.uuid4(), tenant_id=tenant_id,
                       aggregate_type=aggregate_type, aggregate_id=aggregate_id, type=event_type, schema_version=1,
                       payload=payload, actor="service:test", reason=None, correlation_id=None, causation_id=None,
                       traceparent=None, occurred_at=datetime.now(timezone.utc))


async def produce(bootstrap: str, topic: str, events: list[StoredEvent]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = []
        for event in events:
            key, value, event_headers = encode(event, source="/clearhouse/test", traceparent=None)
            futures.append(await producer.send(topic, value, key=key, headers=event_headers))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


@dataclass
class Payment:
    id: uuid.UUID
    amount: int
    currency: str = "EUR"
    value_date: date = date(2026, 3, 2)
    status: str = "settled"
    ledger_amount: int | None = None  # None: the ledger posts the payment's amount
    ledger_currency: str | None = None
    ledger_posted: bool = True
    transaction_id: uuid.UUID = field(default_factory=uuid.uuid4)  # the ledger's posting of it


@dataclass
class Day:
    """A tenant's day of payments, told as the events payments and the ledger publish."""

    tenant: str
    payments: list[Payment] = field(default_factory=list)

    def add(self, amount: int, *, id: str | uuid.UUID | None = None, **fields: Any) -> Payment:
        payment = Payment(id=uuid.UUID(str(id)) if id else uuid.uuid4(), amount=amount, **fields)
        self.payments.append(payment)
        return payment

    def payment_events(self, payment: Payment) -> list[StoredEvent]:
        base = {"payment_id": str(payment.id), "amount": payment.amount, "currency": payment.currency,
                "debit_account_id": "acct_customer_1"}
        flow = [("payment.created.v1", {**base, "reference": "Invoice", "created_by": "alice"}),
                ("payment.approved.v1", {**base, "approval_id": str(uuid.uuid4())}),
                ("payment.submitted.v1", {**base, "processor": "sandbox", "processor_payment_id": "po_1"})]
        if payment.status == "settled":
            flow.append(("payment.settled.v1", {**base, "processor_payment_id": "po_1",
                                                "value_date": payment.value_date.isoformat()}))
        elif payment.status == "failed":
            flow.append(("payment.failed.v1", {**base, "failure_reason": "insufficient_funds"}))
        return [stored_event(t, p, tenant_id=self.tenant, aggregate_type="payment", aggregate_id=str(payment.id))
                for t, p in flow]

    def ledger_events(self, payment: Payment) -> list[StoredEvent]:
        if not payment.ledger_posted:
            return []
        amount = payment.ledger_amount if payment.ledger_amount is not None else payment.amount
        currency = payment.ledger_currency or payment.currency
        transaction_id = str(payment.transaction_id)
        posted_at = datetime.combine(payment.value_date, datetime.min.time(), tzinfo=timezone.utc).replace(hour=12)
        hold_id = str(uuid.uuid4())
        return [
            stored_event("ledger.hold.posted.v1", {
                "hold_id": hold_id, "payment_id": str(payment.id), "amount": amount, "currency": currency,
                "transaction_id": transaction_id, "posted_at": posted_at.isoformat()},
                tenant_id=self.tenant, aggregate_type="hold", aggregate_id=hold_id),
            # The same posting told again as a transaction: counted once (keyed on the transaction).
            stored_event("ledger.transaction.posted.v1", {
                "transaction_id": transaction_id, "external_id": None, "payment_id": str(payment.id),
                "entries": [{"account_id": "a1", "direction": "debit", "amount": amount, "currency": currency},
                            {"account_id": "a2", "direction": "credit", "amount": amount, "currency": currency}],
                "posted_at": posted_at.isoformat(), "kind": "hold_posted"},
                tenant_id=self.tenant, aggregate_type="transaction", aggregate_id=transaction_id),
        ]

    async def settled(self, sessionmaker) -> None:
        """Wait until the read model knows every payment of the day as payments and the
        ledger told it."""
        settled = [p.id for p in self.payments if p.status == "settled"]
        posted = [p.id for p in self.payments if p.ledger_posted]
        await eventually(lambda: scalar(
            sessionmaker, "SELECT count(*) = :n FROM rm_payments WHERE tenant_id = :t AND status = 'settled' "
                          "AND payment_id = ANY(:ids)", n=len(settled), t=self.tenant, ids=settled))
        await eventually(lambda: scalar(
            sessionmaker, "SELECT count(*) = :n FROM rm_ledger_totals WHERE tenant_id = :t AND payment_id = ANY(:ids)",
            n=len(posted), t=self.tenant, ids=posted))

    async def publish(self, settings: Settings, payments: list[Payment] | None = None) -> None:
        chosen = self.payments if payments is None else payments
        await produce(settings.kafka_bootstrap_servers, settings.payments_topic,
                      [e for p in chosen for e in self.payment_events(p)])
        await produce(settings.kafka_bootstrap_servers, settings.ledger_topic,
                      [e for p in chosen for e in self.ledger_events(p)])


def sandbox_csv(lines: list[tuple]) -> bytes:
    """The sandbox processor's statement CSV. Each line: (reference, amount, currency,
    value_date[, credit_debit])."""
    out = ["booking_date,value_date,credit_debit,amount,currency,reference,type,processor_reference"]
    for index, line in enumerate(lines):
        reference, amount, currency, value_date = line[:4]
        direction = line[4] if len(line) > 4 else "DBIT"
        out.append(f"{value_date},{value_date},{direction},{format_minor(amount, currency)},{currency},"
                   f"{reference},payout,po_{index:06d}")
    return ("\n".join(out) + "\n").encode()


async def upload(client: httpx.AsyncClient, private_pem: str, tenant: str, body: bytes,
                 content_type: str = "text/csv", **extra: Any) -> httpx.Response:
    return await client.post("/v1/reconciliation/statements", content=body,
                             headers=headers(private_pem, tenant=tenant, content_type=content_type, **extra))


async def run_statement(client: httpx.AsyncClient, private_pem: str, tenant: str, statement_id: str,
                        sessionmaker, settings: Settings) -> dict[str, Any]:
    """POST a run, let the worker execute it (one round of the job loop), GET the result."""
    created = await client.post("/v1/reconciliation/runs", json={"statement_id": statement_id},
                                headers=headers(private_pem, tenant=tenant))
    assert created.status_code == 202, created.text
    assert await jobs.run_once(sessionmaker, settings=settings) is not None
    found = await client.get(f"/v1/reconciliation/runs/{created.json()['id']}", headers=headers(private_pem,
                                                                                                 tenant=tenant))
    assert found.status_code == 200, found.text
    return found.json()


async def breaks_of(client: httpx.AsyncClient, private_pem: str, tenant: str, **query: Any) -> list[dict]:
    response = await client.get("/v1/reconciliation/breaks", params={"limit": 1000, **query},
                                headers=headers(private_pem, tenant=tenant))
    assert response.status_code == 200, response.text
    return response.json()["data"]

