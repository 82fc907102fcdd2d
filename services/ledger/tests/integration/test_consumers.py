"""The payment flow against the real broker: payment events produced into
payments.events, the ledger's consumers (as `build_consumers` wires them) reserving,
posting and releasing money, idempotent by event id and by payment, whatever the order
of arrival; and the ledger's own events relayed to ledger.events."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from services.ledger.consumers import PAYMENTS_TOPIC, build_consumers
from services.ledger.schemas import EVENT_SCHEMAS
from services.ledger.service import expire_holds
from services.ledger.verify import verify
from shared.db import async_url, plain_url
from shared.envelope import StoredEvent, encode
from shared.kafka import ensure_topics
from shared.relay import Relay
from shared.uow import run_in_transaction
from shared.tests.conftest import eventually, read_topic


@pytest.fixture(scope="module")
async def consumers(ledger_settings, ledger_app, platform):
    """The consumer process's work (inbox consumer + hold expiry), running for the module."""
    await ensure_topics(platform.bootstrap, [PAYMENTS_TOPIC, f"{PAYMENTS_TOPIC}.dlq"])
    settings = ledger_settings.model_copy(update={"consumer_max_attempts": 2})
    workers = build_consumers(settings=settings, sessionmaker=ledger_app.state.sessionmaker)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    yield workers
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 20)


async def publish(platform, *events: StoredEvent) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=platform.bootstrap)
    await producer.start()
    try:
        for event in events:
            key, value, headers = encode(event, source="/clearhouse/payments", traceparent=None)
            await producer.send_and_wait(PAYMENTS_TOPIC, value, key=key, headers=headers)
    finally:
        await producer.stop()


def payment_event(kind: str, tenant: str | None, payment_id: str, **payload) -> StoredEvent:
    return StoredEvent(seq=1, id=uuid.uuid4(), tenant_id=tenant, aggregate_type="payment", aggregate_id=payment_id,
                       type=f"payment.{kind}.v1", schema_version=1, payload={"payment_id": payment_id, **payload},
                       actor="service:payments", reason=None, correlation_id=f"corr-{payment_id}",
                       causation_id=None, traceparent=None, occurred_at=datetime.now(timezone.utc))


class Flow:
    """One tenant's customer account and helpers to watch what the ledger did."""

    def __init__(self, api, sessionmaker, platform, customer: dict) -> None:
        self.api, self.sessionmaker, self.platform, self.customer = api, sessionmaker, platform, customer

    def event(self, kind: str, payment_id: str, amount: int = 2_500, **more) -> StoredEvent:
        fields = {"amount": amount, "currency": "EUR", "debit_account_id": self.customer["id"], **more}
        return payment_event(kind, self.api.tenant, payment_id, **fields)

    async def send(self, *events: StoredEvent) -> None:
        await publish(self.platform, *events)

    async def processed(self, *events: StoredEvent) -> None:
        ids = [e.id for e in events]

        async def done():
            async with self.sessionmaker() as session:
                return (await session.execute(text(
                    "SELECT count(*) FROM processed_events WHERE event_id = ANY(:ids)"), {"ids": ids})).scalar() \
                    == len(set(ids))
        await eventually(done, timeout=30)

    async def ledger_events(self, payment_id: str) -> list[tuple[str, dict]]:
        async with self.sessionmaker() as session:
            rows = await session.execute(text(
                "SELECT type, payload FROM events WHERE tenant_id = :t AND payload->>'payment_id' = :p ORDER BY seq"),
                {"t": self.api.tenant, "p": payment_id})
            return [(r.type, r.payload) for r in rows]

    async def holds(self, payment_id: str) -> list[dict]:
        return (await self.api.get("/v1/ledger/holds", {"payment_id": payment_id})).json()["data"]


@pytest.fixture
async def flow(api, sessionmaker, platform, consumers):
    customer = await api.account()
    await api.fund(customer, 10_000)
    return Flow(api, sessionmaker, platform, customer)


async def test_an_approved_payment_reserves_funds_then_settles(flow):
    approved = flow.event("approved", "pay-1", approval_id="ap-1")
    await flow.send(approved)
    await flow.processed(approved)
    [hold] = await flow.holds("pay-1")
    transit = await flow.api.system_account("payouts_in_transit")
    assert (hold["status"], hold["amount"], hold["debit_account_id"], hold["credit_account_id"]) == (
        "pending", 2_500, flow.customer["id"], transit["id"])
    balance = await flow.api.balance(flow.customer["id"])
    assert (balance["posted"], balance["available"]) == (10_000, 7_500)
    [(kind, placed)] = await flow.ledger_events("pay-1")
    assert kind == "ledger.hold.placed.v1"
    EVENT_SCHEMAS[kind].model_validate(placed)
    assert (placed["hold_id"], placed["account_id"], placed["counter_account_id"], placed["amount"],
            placed["currency"]) == (hold["id"], flow.customer["id"], transit["id"], 2_500, "EUR")

    for action in ("post", "void"):  # the payment's outcome resolves it, nobody else
        refused = await flow.api.post(f"/v1/ledger/holds/{hold['id']}/{action}")
        assert refused.status_code == 409 and refused.json()["code"] == "hold_owned_by_payment"

    settled = flow.event("settled", "pay-1", processor_payment_id="pp-1", value_date="2025-01-31")
    await flow.send(settled)
    await flow.processed(settled)
    [hold] = await flow.holds("pay-1")
    assert hold["status"] == "posted" and hold["amount_posted"] == 2_500
    balance = await flow.api.balance(flow.customer["id"])
    assert (balance["posted"], balance["pending"], balance["available"]) == (7_500, 7_500, 7_500)
    assert (await flow.api.balance(transit["id"]))["posted"] == 2_500
    kinds = [kind for kind, _ in await flow.ledger_events("pay-1")]
    assert kinds == ["ledger.hold.placed.v1", "ledger.transaction.posted.v1", "ledger.hold.posted.v1"]
    posted = dict(await flow.ledger_events("pay-1"))["ledger.transaction.posted.v1"]
    assert posted["payment_id"] == "pay-1" and posted["entries"] == [
        {"account_id": flow.customer["id"], "direction": "debit", "amount": 2_500, "currency": "EUR"},
        {"account_id": transit["id"], "direction": "credit", "amount": 2_500, "currency": "EUR"}]


async def test_a_payments_hold_never_expires(flow, ledger_db):
    """Only the payment's outcome may release its hold: the expiry job, however late it
    runs, leaves it pending, and the database refuses to give it an expiry at all."""
    approved = flow.event("approved", "pay-forever", approval_id="ap-forever")
    await flow.send(approved)
    await flow.processed(approved)
    [hold] = await flow.holds("pay-forever")
    assert hold["status"] == "pending" and hold["expires_at"] is None

    await run_in_transaction(flow.sessionmaker, lambda uow: expire_holds(uow=uow, limit=10_000))
    [hold] = await flow.holds("pay-forever")
    assert hold["status"] == "pending"

    owner = create_async_engine(async_url(ledger_db.owner_url))
    try:
        async with owner.begin() as conn:
            with pytest.raises(IntegrityError, match="only its resolution may change"):
                await conn.execute(text("UPDATE holds SET expires_at = now() - interval '1 day' WHERE id = :id"),
                                   {"id": hold["id"]})
        async with owner.begin() as conn:
            with pytest.raises(IntegrityError, match="holds_payment_never_expires"):
                # The same hold for another payment, with an expiry: refused on the way in.
                await conn.execute(text(
                    "INSERT INTO holds SELECT gen_random_uuid(), tenant_id, debit_account_id, credit_account_id, "
                    "currency, amount, amount_posted, status, 'pay-other', description, now() + interval '1 day', "
                    "placed_transaction_id, resolved_transaction_id, void_reason, created_at, resolved_at "
                    "FROM holds WHERE id = :id"), {"id": hold["id"]})
    finally:
        await owner.dispose()


async def test_a_payment_beyond_the_funds_is_rejected_by_event(flow, sessionmaker):
    approved = flow.event("approved", "pay-poor", amount=10_001)
    await flow.send(approved)
    await flow.processed(approved)
    assert await flow.holds("pay-poor") == []
    [(kind, rejected)] = await flow.ledger_events("pay-poor")
    assert kind == "ledger.hold.rejected.v1"
    EVENT_SCHEMAS[kind].model_validate(rejected)
    assert (rejected["reason"], rejected["amount"], rejected["account_id"]) == (
        "insufficient_funds", 10_001, flow.customer["id"])
    assert (await flow.api.balance(flow.customer["id"]))["available"] == 10_000


async def test_unknown_foreign_and_mismatched_accounts_are_rejected(flow):
    stranger = await flow.api.for_tenant(f"x-{uuid.uuid4().hex[:6]}").account()
    events = [flow.event("approved", "pay-ghost", debit_account_id=str(uuid.uuid4())),
              flow.event("approved", "pay-garbage", debit_account_id="not-a-uuid"),
              flow.event("approved", "pay-foreign", debit_account_id=stranger["id"]),
              flow.event("approved", "pay-usd", currency="USD"),
              flow.event("approved", "pay-gold", currency="XAU")]
    await flow.send(*events)
    await flow.processed(*events)
    reasons = {}
    for payment in ("pay-ghost", "pay-garbage", "pay-foreign", "pay-usd", "pay-gold"):
        [(kind, payload)] = await flow.ledger_events(payment)
        assert kind == "ledger.hold.rejected.v1"
        reasons[payment] = payload["reason"]
    assert reasons == {"pay-ghost": "account_not_found", "pay-garbage": "account_not_found",
                       "pay-foreign": "account_not_found", "pay-usd": "currency_mismatch",
                       "pay-gold": "currency_mismatch"}


async def test_failed_and_cancelled_payments_release_their_holds(flow):
    events = [flow.event("approved", "pay-f"), flow.event("approved", "pay-c", amount=1_000)]
    await flow.send(*events)
    await flow.processed(*events)
    assert (await flow.api.balance(flow.customer["id"]))["available"] == 6_500
    closing = [flow.event("failed", "pay-f", failure_reason="insufficient_funds_at_bank"),
               flow.event("cancelled", "pay-c", reason="customer asked")]
    await flow.send(*closing)
    await flow.processed(*closing)
    [failed], [cancelled] = await flow.holds("pay-f"), await flow.holds("pay-c")
    assert (failed["status"], failed["void_reason"]) == ("voided", "payment_failed: insufficient_funds_at_bank")
    assert (cancelled["status"], cancelled["void_reason"]) == ("voided", "payment_cancelled: customer asked")
    balance = await flow.api.balance(flow.customer["id"])
    assert (balance["posted"], balance["available"]) == (10_000, 10_000)
    assert [k for k, _ in await flow.ledger_events("pay-f")] == ["ledger.hold.placed.v1", "ledger.hold.voided.v1"]


async def test_redelivery_and_replays_never_move_money_twice(flow):
    approved = flow.event("approved", "pay-dup", amount=1_000)
    again_other_id = flow.event("approved", "pay-dup", amount=1_000)  # the producer re-ran: a new event id
    await flow.send(approved, approved, again_other_id, approved)
    settled, settled_again = flow.event("settled", "pay-dup", amount=1_000), flow.event("settled", "pay-dup",
                                                                                         amount=1_000)
    await flow.send(settled, settled_again, settled)
    await flow.processed(approved, again_other_id, settled, settled_again)
    assert len(await flow.holds("pay-dup")) == 1
    kinds = [k for k, _ in await flow.ledger_events("pay-dup")]
    assert kinds == ["ledger.hold.placed.v1", "ledger.transaction.posted.v1", "ledger.hold.posted.v1"]
    assert (await flow.api.balance(flow.customer["id"]))["posted"] == 9_000


async def test_refunds_give_the_money_back_once_each_and_never_more_than_was_paid(flow, sessionmaker, platform,
                                                                                   ledger_db):
    approved = flow.event("approved", "pay-refund", amount=2_500)
    settled = flow.event("settled", "pay-refund", amount=2_500)
    first = flow.event("refunded", "pay-refund", amount=1_000, refund_id="rf-1")
    first_again_other_id = flow.event("refunded", "pay-refund", amount=1_000, refund_id="rf-1")
    second = flow.event("refunded", "pay-refund", amount=1_500, refund_id="rf-2")
    beyond = flow.event("refunded", "pay-refund", amount=1, refund_id="rf-3")  # nothing left to refund
    await flow.send(approved, settled, first, first, first_again_other_id, second, beyond)
    await flow.processed(approved, settled, first, first_again_other_id, second, beyond)

    transit = await flow.api.system_account("payouts_in_transit")
    customer = await flow.api.balance(flow.customer["id"])
    assert (customer["posted"], customer["pending"], customer["available"]) == (10_000, 10_000, 10_000)
    assert (await flow.api.balance(transit["id"]))["posted"] == 0
    refunds = [payload for kind, payload in await flow.ledger_events("pay-refund")
               if kind == "ledger.transaction.posted.v1" and payload["kind"] == "payment_refund"]
    assert [(r["refund_id"], r["entries"]) for r in refunds] == [
        (refund_id, [{"account_id": transit["id"], "direction": "debit", "amount": amount, "currency": "EUR"},
                     {"account_id": flow.customer["id"], "direction": "credit", "amount": amount, "currency": "EUR"}])
        for refund_id, amount in (("rf-1", 1_000), ("rf-2", 1_500))]
    for refund in refunds:
        EVENT_SCHEMAS["ledger.transaction.posted.v1"].model_validate(refund)
    async with sessionmaker() as session:
        outcome = (await session.execute(text("SELECT outcome FROM processed_events WHERE event_id = :id"),
                                         {"id": beyond.id})).scalar()
    assert outcome == "dead_lettered"

    assert [v for v in await verify(ledger_db.app_url) if "pay-refund" in v] == []
    tamper = await asyncpg.connect(plain_url(platform.superuser_url(ledger_db)))
    try:  # as someone with the database's keys: the refund row now claims more than was paid
        await tamper.execute("SET session_replication_role = replica")
        await tamper.execute("UPDATE payment_refunds SET amount = amount + 1 WHERE refund_id = 'rf-2'")
    finally:
        await tamper.close()
    assert any("pay-refund" in v and "refunded 2501, but its settlement posted 2500" in v
               for v in await verify(ledger_db.app_url))


async def test_a_refund_without_a_settlement_moves_nothing(flow, sessionmaker):
    approved = flow.event("approved", "pay-unsettled", amount=700)
    refunded = flow.event("refunded", "pay-unsettled", amount=700, refund_id="rf-early")
    await flow.send(approved, refunded)
    await flow.processed(approved, refunded)
    async with sessionmaker() as session:
        outcome = (await session.execute(text("SELECT outcome FROM processed_events WHERE event_id = :id"),
                                         {"id": refunded.id})).scalar()
    assert outcome == "dead_lettered"
    balance = await flow.api.balance(flow.customer["id"])
    assert (balance["posted"], balance["available"]) == (10_000, 9_300)


async def test_out_of_order_arrivals_decide_once_and_move_nothing(flow):
    # Settled before approved: nothing is posted (there is no reservation to post), the
    # fact is recorded, and the late approval reserves nothing.
    early = [flow.event("settled", "pay-late"), flow.event("failed", "pay-gone", failure_reason="x"),
             flow.event("cancelled", "pay-off")]
    await flow.send(*early)
    await flow.processed(*early)
    late = [flow.event("approved", p) for p in ("pay-late", "pay-gone", "pay-off")]
    await flow.send(*late)
    await flow.processed(*late)
    for payment, reason in (("pay-late", "payment_settled_without_hold"), ("pay-gone", "payment_failed_before_hold"),
                            ("pay-off", "payment_cancelled_before_hold")):
        assert await flow.holds(payment) == []
        [(kind, payload)] = await flow.ledger_events(payment)
        assert kind == "ledger.hold.skipped.v1" and payload["reason"] == reason
        EVENT_SCHEMAS[kind].model_validate(payload)
    balance = await flow.api.balance(flow.customer["id"])
    assert (balance["posted"], balance["available"]) == (10_000, 10_000)
    # A settlement after a rejection or a void posts nothing either.
    rejected = flow.event("approved", "pay-no", amount=999_999)
    await flow.send(rejected, flow.event("settled", "pay-no", amount=999_999))
    voided = [flow.event("approved", "pay-v", amount=5), flow.event("failed", "pay-v"),
              flow.event("settled", "pay-v", amount=5)]
    await flow.send(*voided)
    await flow.processed(rejected, *voided)
    assert (await flow.api.balance(flow.customer["id"]))["posted"] == 10_000
    assert [h["status"] for h in await flow.holds("pay-v")] == ["voided"]


async def test_an_unusable_event_is_parked_and_the_partition_moves_on(flow, platform, sessionmaker):
    approved = flow.event("approved", "pay-odd", amount=100)
    too_much = flow.event("settled", "pay-odd", amount=101)  # more than was reserved
    no_tenant = payment_event("approved", None, "pay-odd", amount=1, currency="EUR",
                              debit_account_id=flow.customer["id"])
    after = flow.event("failed", "pay-odd", failure_reason="returned")
    await flow.send(approved, too_much, no_tenant, after)  # one key: one partition, in this order
    await flow.processed(approved, too_much, no_tenant, after)
    async with sessionmaker() as session:
        outcomes = dict((await session.execute(text(
            "SELECT event_id, outcome FROM processed_events WHERE event_id = ANY(:ids)"),
            {"ids": [too_much.id, no_tenant.id, after.id]})).all())
    assert outcomes == {too_much.id: "dead_lettered", no_tenant.id: "dead_lettered", after.id: "applied"}
    dead = await read_topic(platform.bootstrap, f"{PAYMENTS_TOPIC}.dlq", expect=2)
    errors = {dict(r.headers)["ce_id"].decode(): dict(r.headers)["dlq_error"].decode() for r in dead}
    assert "settled 101 EUR but its hold" in errors[str(too_much.id)]
    assert "carries no tenant" in errors[str(no_tenant.id)]
    [hold] = await flow.holds("pay-odd")
    assert hold["status"] == "voided"  # the failure after the parked messages still applied


async def test_the_ledgers_events_reach_ledger_events_through_the_relay(flow, platform, ledger_db):
    approved = flow.event("approved", "pay-relayed", amount=10)
    await flow.send(approved)
    await flow.processed(approved)
    await ensure_topics(platform.bootstrap, ["ledger.events", "ledger.events.dlq"])
    relay = Relay(service="ledger", database_url=ledger_db.app_url, bootstrap=platform.bootstrap,
                  poll_interval_s=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        async def relayed():
            records = await read_topic(platform.bootstrap, "ledger.events", expect=1, timeout=2)
            return [r for r in records if dict(r.headers).get("ce_type") == b"ledger.hold.placed.v1"
                    and b"pay-relayed" in r.value]
        [record] = await eventually(relayed, timeout=30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    headers = dict(record.headers)
    assert headers["ce_tenantid"].decode() == flow.api.tenant
    assert headers["ce_causationid"].decode() == str(approved.id)
    assert headers["ce_correlationid"].decode() == "corr-pay-relayed"
    assert headers["ce_actor"] == b"service:ledger"
