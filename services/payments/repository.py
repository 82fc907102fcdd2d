"""SQL of the payments service: the tables as SQLAlchemy Core objects and the queries
the use cases run.

Every query that a tenant can reach is scoped by `tenant_id`: another tenant's payment
is simply not found. Queries used by processor webhooks and jobs, which act for no
tenant, look rows up by the ids this service itself issued (attempt ids, processor ids)
and then act under the tenant stored on the row.

Rows that a transition will change are read `FOR UPDATE`: concurrent writers of one
payment (a cancel racing an approval, two copies of one webhook) queue on its row and the
second sees the first one's result. To stay deadlock-free, writers lock the payment row
before any attempt or refund row of that payment.

This module holds no business rule and never decrypts anything.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger, Boolean, Column, Date, DateTime, Integer, LargeBinary, MetaData, Table, Text, and_, bindparam,
    column, func, insert, literal_column, or_, select, text, tuple_, update,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID, insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.payments.crypto import SealedPayee
from services.payments.domain import (
    AttemptStatus, Payment, PaymentStatus, RecordedEvent, Refund, RefundStatus,
)

metadata = MetaData()

payments = Table(
    "payments", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", Text, nullable=False),
    Column("debit_account_id", Text, nullable=False),
    Column("reference", Text, nullable=False),
    Column("metadata", JSONB, nullable=False),
    Column("payee_name_masked", Text, nullable=False),
    Column("payee_iban_masked", Text, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("failure_reason", Text),
    Column("cancellation_reason", Text),
    Column("approval_id", Text),
    Column("hold_id", Text),
    Column("processor", Text),
    Column("processor_payment_id", Text),
    Column("value_date", Date),
    Column("refunded_amount", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

payee_vault = Table(
    "payee_vault", metadata,
    Column("payment_id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("key_id", Text, nullable=False),
    Column("name_ciphertext", LargeBinary, nullable=False),
    Column("iban_ciphertext", LargeBinary, nullable=False),
)

refunds = Table(
    "refunds", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("payment_id", UUID(as_uuid=True), nullable=False),
    Column("status", Text, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", Text, nullable=False),
    Column("reason", Text),
    Column("failure_reason", Text),
    Column("processor_refund_id", Text),
    Column("created_by", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

attempts = Table(
    "processor_attempts", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("payment_id", UUID(as_uuid=True), nullable=False),
    Column("refund_id", UUID(as_uuid=True)),
    Column("processor", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("tries", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("lease_until", DateTime(timezone=True)),
    Column("processor_object_id", Text),
    Column("last_error", Text),
    Column("correlation_id", Text),
    Column("traceparent", Text),
    Column("created_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True)),
)

webhook_events = Table(
    "processor_webhook_events", metadata,
    Column("processor", Text, primary_key=True),
    Column("event_id", Text, primary_key=True),
    Column("event_type", Text, nullable=False),
    Column("attempt_id", UUID(as_uuid=True)),
    Column("outcome", Text, nullable=False),
)

events = Table(
    "events", metadata,
    Column("seq", BigInteger, primary_key=True),
    Column("id", UUID(as_uuid=True)),
    Column("tenant_id", Text),
    Column("aggregate_type", Text),
    Column("aggregate_id", Text),
    Column("type", Text),
    Column("payload", JSONB),
    Column("actor", Text),
    Column("reason", Text),
    Column("correlation_id", Text),
    Column("occurred_at", DateTime(timezone=True)),
)

NOW = func.clock_timestamp()


# ── payments ────────────────────────────────────────────────────────────────────────


def _payment_values(payment: Payment) -> dict[str, Any]:
    return {
        "status": str(payment.status), "amount": payment.amount, "currency": payment.currency,
        "debit_account_id": payment.debit_account_id, "reference": payment.reference, "metadata": payment.metadata,
        "payee_name_masked": payment.payee_name_masked, "payee_iban_masked": payment.payee_iban_masked,
        "created_by": payment.created_by, "failure_reason": payment.failure_reason,
        "cancellation_reason": payment.cancellation_reason, "approval_id": payment.approval_id,
        "hold_id": payment.hold_id, "processor": payment.processor,
        "processor_payment_id": payment.processor_payment_id, "value_date": payment.value_date,
        "refunded_amount": payment.refunded_amount, "version": payment.version,
        "created_at": payment.created_at, "updated_at": payment.updated_at,
    }


def payment_from_row(row: Any) -> Payment:
    payment = Payment(id=row.id, tenant_id=row.tenant_id)
    for name, value in row._mapping.items():
        if name not in ("id", "tenant_id") and hasattr(payment, name):
            setattr(payment, name, value)
    payment.status = PaymentStatus(row.status)
    return payment


_PAYMENT_COLUMNS = [c.name for c in payments.c if c.name not in ("id", "tenant_id")]
# The order row and its sealed payee in one statement (one round trip on the hot path).
_ADD_PAYMENT = text(
    f"""
    WITH payment AS (
        INSERT INTO payments (id, tenant_id, {", ".join(_PAYMENT_COLUMNS)})
        VALUES (:id, :tenant_id, {", ".join(f":{c}" for c in _PAYMENT_COLUMNS)})
        RETURNING id, tenant_id)
    INSERT INTO payee_vault (payment_id, tenant_id, key_id, name_ciphertext, iban_ciphertext)
    SELECT id, tenant_id, :key_id, :name_ciphertext, :iban_ciphertext FROM payment
    """
).bindparams(*(bindparam(c.name, type_=c.type) for c in payments.c),
             bindparam("name_ciphertext", type_=LargeBinary), bindparam("iban_ciphertext", type_=LargeBinary))
_SAVE_PAYMENT_SET = ", ".join(f"{c} = :{c}" for c in _PAYMENT_COLUMNS)
_SAVE_PAYMENT = text(f"UPDATE payments SET {_SAVE_PAYMENT_SET} WHERE id = :id").bindparams(
    *(bindparam(c.name, type_=c.type) for c in payments.c if c.name != "tenant_id"))


async def add_payment(session: AsyncSession, *, payment: Payment, sealed: SealedPayee) -> None:
    await session.execute(_ADD_PAYMENT, {
        "id": payment.id, "tenant_id": payment.tenant_id, **_payment_values(payment),
        "key_id": sealed.key_id, "name_ciphertext": sealed.name, "iban_ciphertext": sealed.iban})


async def save_payment(session: AsyncSession, payment: Payment) -> None:
    await session.execute(_SAVE_PAYMENT, {"id": payment.id, **_payment_values(payment)})


async def get_payment(session: AsyncSession, *, tenant_id: str, payment_id: uuid.UUID,
                      for_update: bool = False) -> Payment | None:
    query = select(payments).where(payments.c.id == payment_id, payments.c.tenant_id == tenant_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return payment_from_row(row) if row else None


async def lock_payment_by_id(session: AsyncSession, payment_id: uuid.UUID) -> Payment | None:
    """For jobs and webhooks, which act on ids this service issued, for no tenant."""
    row = (await session.execute(select(payments).where(payments.c.id == payment_id).with_for_update())).first()
    return payment_from_row(row) if row else None


async def list_payments(
    session: AsyncSession,
    *,
    tenant_id: str,
    status: str | None,
    created_gte: datetime | None,
    created_lt: datetime | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Payment]:
    query = select(payments).where(payments.c.tenant_id == tenant_id)
    if status is not None:
        query = query.where(payments.c.status == status)
    if created_gte is not None:
        query = query.where(payments.c.created_at >= created_gte)
    if created_lt is not None:
        query = query.where(payments.c.created_at < created_lt)
    if after is not None:
        query = query.where(tuple_(payments.c.created_at, payments.c.id) < tuple_(*after))
    query = query.order_by(payments.c.created_at.desc(), payments.c.id.desc()).limit(limit)
    return [payment_from_row(row) for row in await session.execute(query)]


async def get_sealed_payee(session: AsyncSession, payment_id: uuid.UUID) -> SealedPayee:
    row = (await session.execute(select(payee_vault).where(payee_vault.c.payment_id == payment_id))).one()
    return SealedPayee(key_id=row.key_id, name=bytes(row.name_ciphertext), iban=bytes(row.iban_ciphertext))


async def payment_history(session: AsyncSession, *, tenant_id: str, payment_id: uuid.UUID) -> list[Any]:
    """The payment's own events and its refunds' events, oldest first (the audit trail)."""
    key = str(payment_id)
    query = (
        select(events.c.id, events.c.type, events.c.aggregate_type, events.c.aggregate_id, events.c.payload,
               events.c.actor, events.c.reason, events.c.correlation_id, events.c.occurred_at)
        .where(events.c.tenant_id == tenant_id,
               or_(and_(events.c.aggregate_type == "payment", events.c.aggregate_id == key),
                   and_(events.c.aggregate_type == "refund", events.c.payload["payment_id"].astext == key)))
        .order_by(events.c.seq)
        .limit(1000)
    )
    return list(await session.execute(query))


# ── refunds ─────────────────────────────────────────────────────────────────────────


def _refund_values(refund: Refund) -> dict[str, Any]:
    return {
        "payment_id": refund.payment_id, "status": str(refund.status), "amount": refund.amount,
        "currency": refund.currency, "reason": refund.reason, "failure_reason": refund.failure_reason,
        "processor_refund_id": refund.processor_refund_id, "created_by": refund.created_by,
        "version": refund.version, "created_at": refund.created_at, "updated_at": refund.updated_at,
    }


def refund_from_row(row: Any) -> Refund:
    refund = Refund(id=row.id, tenant_id=row.tenant_id)
    for name, value in row._mapping.items():
        if name not in ("id", "tenant_id"):
            setattr(refund, name, value)
    refund.status = RefundStatus(row.status)
    return refund


async def add_refund(session: AsyncSession, refund: Refund) -> None:
    await session.execute(insert(refunds).values(id=refund.id, tenant_id=refund.tenant_id, **_refund_values(refund)))


async def save_refund(session: AsyncSession, refund: Refund) -> None:
    await session.execute(update(refunds).where(refunds.c.id == refund.id).values(**_refund_values(refund)))


async def get_refund(session: AsyncSession, *, tenant_id: str, payment_id: uuid.UUID, refund_id: uuid.UUID,
                     for_update: bool = False) -> Refund | None:
    query = select(refunds).where(refunds.c.id == refund_id, refunds.c.payment_id == payment_id,
                                  refunds.c.tenant_id == tenant_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return refund_from_row(row) if row else None


async def list_refunds(session: AsyncSession, *, tenant_id: str, payment_id: uuid.UUID) -> list[Refund]:
    query = (select(refunds).where(refunds.c.payment_id == payment_id, refunds.c.tenant_id == tenant_id)
             .order_by(refunds.c.created_at, refunds.c.id).limit(1000))
    return [refund_from_row(row) for row in await session.execute(query)]


async def open_refunds_total(session: AsyncSession, payment_id: uuid.UUID) -> int:
    """Refunds still in flight; call with the payment row locked so the sum is stable."""
    query = select(func.coalesce(func.sum(refunds.c.amount), 0)).where(
        refunds.c.payment_id == payment_id, refunds.c.status.in_(["pending", "submitted"]))
    return int((await session.execute(query)).scalar_one())


# ── processor attempts ───────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Attempt:
    id: uuid.UUID
    tenant_id: str
    kind: str
    payment_id: uuid.UUID
    refund_id: uuid.UUID | None
    processor: str
    status: AttemptStatus
    tries: int
    processor_object_id: str | None
    correlation_id: str | None
    traceparent: str | None
    updated_at: datetime | None = None


def _attempt(row: Any) -> Attempt:
    return Attempt(id=row.id, tenant_id=row.tenant_id, kind=row.kind, payment_id=row.payment_id,
                   refund_id=row.refund_id, processor=row.processor, status=AttemptStatus(row.status),
                   tries=row.tries, processor_object_id=row.processor_object_id,
                   correlation_id=row.correlation_id, traceparent=row.traceparent, updated_at=row.updated_at)


async def add_attempt(
    session: AsyncSession, *, attempt_id: uuid.UUID, tenant_id: str, kind: str, payment_id: uuid.UUID,
    refund_id: uuid.UUID | None, processor: str, correlation_id: str | None, traceparent: str | None,
) -> bool:
    """False when the payment (or refund) already has its attempt: one request, ever."""
    statement = pg_insert(attempts).values(
        id=attempt_id, tenant_id=tenant_id, kind=kind, payment_id=payment_id, refund_id=refund_id,
        processor=processor, status=str(AttemptStatus.PENDING), tries=0, next_attempt_at=NOW,
        correlation_id=correlation_id, traceparent=traceparent,
    ).on_conflict_do_nothing().returning(attempts.c.id)
    return (await session.execute(statement)).first() is not None


async def payout_attempt(session: AsyncSession, payment_id: uuid.UUID, *, for_update: bool = False) -> Attempt | None:
    query = select(attempts).where(attempts.c.payment_id == payment_id, attempts.c.kind == "payout")
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return _attempt(row) if row else None


async def get_attempt(session: AsyncSession, attempt_id: uuid.UUID, *, for_update: bool = False) -> Attempt | None:
    query = select(attempts).where(attempts.c.id == attempt_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return _attempt(row) if row else None


async def attempt_by_processor_object(session: AsyncSession, *, processor: str, kind: str,
                                      processor_object_id: str) -> Attempt | None:
    row = (await session.execute(select(attempts).where(
        attempts.c.processor == processor, attempts.c.kind == kind,
        attempts.c.processor_object_id == processor_object_id))).first()
    return _attempt(row) if row else None


async def set_attempt(session: AsyncSession, attempt_id: uuid.UUID, **values: Any) -> None:
    """Update an attempt's columns; `next_in_s` sets next_attempt_at relative to the
    database clock (the one all replicas share)."""
    delay = values.pop("next_in_s", None)
    if delay is not None:
        values["next_attempt_at"] = NOW + func.make_interval(0, 0, 0, 0, 0, 0, delay)
    lease = values.pop("lease_s", None)
    if lease is not None:
        values["lease_until"] = NOW + func.make_interval(0, 0, 0, 0, 0, 0, lease)
    if "status" in values:
        values["status"] = str(values["status"])
    await session.execute(update(attempts).where(attempts.c.id == attempt_id).values(updated_at=NOW, **values))


async def claim_due_attempts(session: AsyncSession, *, limit: int) -> list[tuple[Attempt, Payment]]:
    """Attempts due to be sent, with their payments, both locked; rows another worker holds
    are skipped, never waited for. A `sending` attempt whose lease ran out belongs to a
    submitter that died mid-request: it is due again (the processor request id makes a
    second send harmless)."""
    due = or_(
        and_(attempts.c.status == "pending", attempts.c.next_attempt_at <= NOW),
        and_(attempts.c.status == "sending", attempts.c.lease_until <= NOW),
    )
    query = (
        select(attempts)
        .join(payments, payments.c.id == attempts.c.payment_id)
        .where(due)
        .order_by(attempts.c.next_attempt_at)
        .limit(limit)
        .with_for_update(of=[attempts, payments], skip_locked=True)
    )
    rows = list(await session.execute(query))
    if not rows:
        return []
    # The payment rows are already locked by the query above.
    found = {row.id: payment_from_row(row) for row in await session.execute(
        select(payments).where(payments.c.id.in_([row.payment_id for row in rows])))}
    return [(_attempt(row), found[row.payment_id]) for row in rows]


async def claim_attempts_to_check(session: AsyncSession, *, limit: int, stuck_after_s: float,
                                  recheck_s: float) -> list[Attempt]:
    """Attempts the janitor should ask the processor about: submitted long ago with no
    final word, or in doubt after retries ran out. Claimed by pushing their next check
    out, so a second janitor does not poll them at the same time."""
    stuck = or_(
        and_(attempts.c.status == "submitted",
             attempts.c.updated_at <= NOW - func.make_interval(0, 0, 0, 0, 0, 0, stuck_after_s),
             attempts.c.next_attempt_at <= NOW),
        and_(attempts.c.status == "unknown", attempts.c.next_attempt_at <= NOW),
    )
    query = (select(attempts).where(stuck).order_by(attempts.c.next_attempt_at).limit(limit)
             .with_for_update(skip_locked=True))
    rows = list(await session.execute(query))
    if rows:
        await session.execute(update(attempts).where(attempts.c.id.in_([r.id for r in rows])).values(
            next_attempt_at=NOW + func.make_interval(0, 0, 0, 0, 0, 0, recheck_s)))
    return [_attempt(row) for row in rows]


# ── processor news: the webhook hot path ─────────────────────────────────────────────

_PAYMENT_OF_ATTEMPT = text(
    "SELECT * FROM payments WHERE id = (SELECT payment_id FROM processor_attempts WHERE id = :attempt_id) "
    "FOR UPDATE"
).bindparams(bindparam("attempt_id", type_=UUID(as_uuid=True))).columns(*payments.c)
# A new statement after the payment lock is held: in READ COMMITTED it sees whatever a
# concurrent copy of the same event committed while we waited for the lock.
_ATTEMPT_AND_SEEN = text(
    """
    SELECT a.*, EXISTS (SELECT 1 FROM processor_webhook_events w
                        WHERE w.processor = :processor AND w.event_id = :event_id) AS seen
    FROM processor_attempts a WHERE a.id = :attempt_id FOR UPDATE
    """
).bindparams(bindparam("attempt_id", type_=UUID(as_uuid=True))).columns(*attempts.c, column("seen", Boolean))


async def lock_payment_of_attempt(session: AsyncSession, attempt_id: uuid.UUID) -> Payment | None:
    row = (await session.execute(_PAYMENT_OF_ATTEMPT, {"attempt_id": attempt_id})).first()
    return payment_from_row(row) if row else None


async def lock_attempt_and_check_seen(session: AsyncSession, *, attempt_id: uuid.UUID, processor: str,
                                      event_id: str) -> tuple[Attempt | None, bool]:
    row = (await session.execute(_ATTEMPT_AND_SEEN, {"attempt_id": attempt_id, "processor": processor,
                                                     "event_id": event_id})).first()
    return (_attempt(row), row.seen) if row else (None, False)


async def record_processor_news(
    session: AsyncSession, *, payment: Payment | None, attempt_id: uuid.UUID, attempt_status: str | None,
    processor_object_id: str | None, processor: str, event_id: str, event_type: str, outcome: str,
) -> None:
    """One statement for what applying a processor event changed: the payment row (if it
    moved), the attempt (if it advanced) and the inbox row that makes the event id seen."""
    parts, params = [], {"w_processor": processor, "w_event_id": event_id, "w_event_type": event_type,
                         "w_attempt_id": attempt_id, "w_outcome": outcome}
    binds = [bindparam("w_attempt_id", type_=UUID(as_uuid=True))]
    if payment is not None:
        parts.append(f"payment AS (UPDATE payments SET {_SAVE_PAYMENT_SET} WHERE id = :id RETURNING 1)")
        params.update(id=payment.id, **_payment_values(payment))
        binds += [bindparam(c.name, type_=c.type) for c in payments.c if c.name != "tenant_id"]
    if attempt_status is not None:
        parts.append(
            "attempt AS (UPDATE processor_attempts SET status = :a_status, lease_until = NULL, "
            "processor_object_id = COALESCE(:a_object_id, processor_object_id), "
            "next_attempt_at = clock_timestamp(), updated_at = clock_timestamp() WHERE id = :w_attempt_id "
            "RETURNING 1)")
        params.update(a_status=attempt_status, a_object_id=processor_object_id)
        binds.append(bindparam("a_object_id", type_=Text))
    statement = (f"WITH {', '.join(parts)} " if parts else "") + (
        "INSERT INTO processor_webhook_events (processor, event_id, event_type, attempt_id, outcome) "
        "VALUES (:w_processor, :w_event_id, :w_event_type, :w_attempt_id, :w_outcome) ON CONFLICT DO NOTHING")
    await session.execute(text(statement).bindparams(*binds), params)


# ── processor webhook inbox ──────────────────────────────────────────────────────────


_SEEN = text("SELECT 1 FROM processor_webhook_events WHERE processor = :processor AND event_id = :event_id")


async def processor_event_seen(session: AsyncSession, *, processor: str, event_id: str) -> bool:
    return (await session.execute(_SEEN, {"processor": processor, "event_id": event_id})).first() is not None


async def remember_processor_event(session: AsyncSession, *, processor: str, event_id: str, event_type: str,
                                   attempt_id: uuid.UUID | None, outcome: str) -> bool:
    """Record a processor event with what it did; False if that id was already recorded."""
    statement = pg_insert(webhook_events).values(
        processor=processor, event_id=event_id, event_type=event_type, attempt_id=attempt_id, outcome=outcome,
    ).on_conflict_do_nothing().returning(literal_column("1"))
    return (await session.execute(statement)).first() is not None


def recorded(row: Any) -> RecordedEvent:
    return RecordedEvent(type=row.type, payload=row.payload, occurred_at=row.occurred_at)
