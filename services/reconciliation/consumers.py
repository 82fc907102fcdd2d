"""Event handlers of the reconciliation service: its own read model of payments and of
the ledger's postings, built from their events (never from their databases).

    payment.created/approved/funds_reserved/rejected/submitted/settled/failed/cancelled/refunded
        → rm_payments (+ rm_refunds for a refund): amount, currency, status, value date
    ledger.hold.posted, ledger.transaction.posted (with a payment_id; reversals and other
    postings, a hold's posting being told by hold.posted)
        → rm_ledger_postings, rm_ledger_totals: what the ledger moved for each payment

Idempotent twice over: the kit's inbox skips an event id it applied, and every write is
keyed on its business identity (payment id, transaction id), so the same fact arriving
under another event id changes nothing. Monotonic: a payment's status only moves forward
in the producer's event order (`ce_seq`), so a late, older event never regresses it.
A payload the read model cannot use raises and ends in the DLQ, where a person sees it.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from services.reconciliation import service
from services.reconciliation.schemas import HoldPostedIn, PaymentEventIn, TransactionPostedIn
from services.reconciliation.settings import Settings
from shared.envelope import InboundEvent
from shared.inbox import Consumer
from shared.uow import UnitOfWork

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

PAYMENT_EVENTS = ("payment.created.v1", "payment.approved.v1", "payment.funds_reserved.v1", "payment.rejected.v1",
                  "payment.submitted.v1", "payment.settled.v1", "payment.failed.v1", "payment.cancelled.v1",
                  "payment.refunded.v1")


class UnusableEvent(Exception):
    """The event cannot be applied as it is; retrying will not help, the DLQ will."""


def _tenant(event: InboundEvent) -> str:
    if not event.tenant_id:
        raise UnusableEvent(f"{event.type} {event.id} carries no tenant (ce_tenantid)")
    return event.tenant_id


def _payload(model: type[M], event: InboundEvent) -> M:
    try:
        return model.model_validate(event.data)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "(payload)" for e in exc.errors())
        raise UnusableEvent(f"{event.type} {event.id}: invalid fields {fields}") from None


def _seq(event: InboundEvent) -> int | None:
    value = event.extra_headers.get("ce_seq")
    return int(value) if value and value.isdigit() else None


def _time(event: InboundEvent) -> datetime | None:
    try:
        return datetime.fromisoformat(event.time) if event.time else None
    except ValueError:
        return None


async def on_payment_event(uow: UnitOfWork, event: InboundEvent) -> None:
    payload = _payload(PaymentEventIn, event)
    if event.type == "payment.settled.v1" and payload.value_date is None:
        raise UnusableEvent(f"{event.type} {event.id}: a settlement without value_date")
    fact = service.payment_fact(tenant_id=_tenant(event), event_type=event.type, payload=payload, seq=_seq(event),
                                event_time=_time(event))
    await service.apply_payment_event(uow=uow, fact=fact)


async def on_hold_posted(uow: UnitOfWork, event: InboundEvent) -> None:
    payload = _payload(HoldPostedIn, event)
    posting = service.ledger_posting(tenant_id=_tenant(event), transaction=TransactionPostedIn(
        transaction_id=payload.transaction_id, payment_id=payload.payment_id, posted_at=payload.posted_at,
        kind="hold_posted",
        entries=[{"direction": "debit", "amount": payload.amount, "currency": payload.currency},
                 {"direction": "credit", "amount": payload.amount, "currency": payload.currency}]))
    if posting is None:
        log.warning("hold posted for a payment id that is not a UUID; not reconcilable",
                    extra={"event_id": str(event.id)})
        return
    await service.apply_ledger_posting(uow=uow, posting=posting)


async def on_transaction_posted(uow: UnitOfWork, event: InboundEvent) -> None:
    if not event.data.get("payment_id"):
        return  # journal entries that are not about a payment are not reconciled here
    if event.data.get("kind") == "hold_posted":
        # ledger.hold.posted tells this posting already. Taking it from one event only
        # matters: the two are keyed by different aggregates, so they arrive on different
        # partitions, and two consumer transactions inserting the same posting would wait
        # on (and deadlock with) each other.
        return
    payload = _payload(TransactionPostedIn, event)
    try:
        posting = service.ledger_posting(tenant_id=_tenant(event), transaction=payload)
    except ValueError as exc:
        raise UnusableEvent(str(exc)) from None
    if posting is not None:
        await service.apply_ledger_posting(uow=uow, posting=posting)


HANDLERS = {
    **{event_type: on_payment_event for event_type in PAYMENT_EVENTS},
    "ledger.hold.posted.v1": on_hold_posted,
    "ledger.transaction.posted.v1": on_transaction_posted,
}


def build_consumers(*, settings: Settings, sessionmaker) -> list[Consumer]:
    return [Consumer(name=settings.read_model_consumer, service=settings.service_name,
                     topics=[settings.payments_topic, settings.ledger_topic], handlers=HANDLERS,
                     sessionmaker=sessionmaker, bootstrap=settings.kafka_bootstrap_servers,
                     max_attempts=settings.consumer_max_attempts, batch_size=settings.consumer_batch_size)]
