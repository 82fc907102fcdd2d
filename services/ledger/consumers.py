"""Event handlers of the ledger: the payment flow reserves, posts and releases money.

    payment.approved.v1   → hold on the payment's debit account, credit payouts_in_transit
                            → ledger.hold.placed.v1, or ledger.hold.rejected.v1 (a refusal
                              is an event, never an exception)
    payment.settled.v1    → post the hold                    → ledger.hold.posted.v1 (+ transaction.posted)
    payment.failed.v1     → void the hold                    → ledger.hold.voided.v1
    payment.cancelled.v1  → void the hold                    → ledger.hold.voided.v1
    (before any hold)     → nothing moves                    → ledger.hold.skipped.v1
    payment.refunded.v1   → refund back to the customer, out of payouts_in_transit
                                                             → ledger.transaction.posted.v1 (kind payment_refund)

Idempotent twice over: the inbox skips an event id it has applied, and each payment has
one immutable decision row (and each refund one row), so a redelivery under another id
cannot move money twice.
A payload the ledger cannot apply (missing tenant or fields, a settlement above the
hold) raises: it is retried, then parked in payments.events.dlq for a person.

The consumer process also runs the hold-expiry job (the kit has no room for jobs yet).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from services.ledger import service
from services.ledger.schemas import PaymentApproved, PaymentClosed, PaymentRefunded, PaymentSettled
from shared import context
from shared.envelope import InboundEvent
from shared.inbox import Consumer
from shared.uow import UnitOfWork, run_in_transaction

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

PAYMENTS_TOPIC = "payments.events"
CONSUMER_NAME = "ledger-payments"


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


async def on_payment_approved(uow: UnitOfWork, event: InboundEvent) -> None:
    payment = _payload(PaymentApproved, event)
    outcome = await service.reserve_for_payment(uow=uow, tenant_id=_tenant(event), event_id=event.id,
                                                payment=payment)
    log.info("payment %s approved: hold %s", payment.payment_id, outcome, extra={"payment_id": payment.payment_id})


async def on_payment_settled(uow: UnitOfWork, event: InboundEvent) -> None:
    payment = _payload(PaymentSettled, event)
    try:
        outcome = await service.settle_payment(uow=uow, tenant_id=_tenant(event), event_id=event.id,
                                               payment=payment)
    except service.PaymentContractViolation as exc:
        raise UnusableEvent(str(exc)) from None
    log.info("payment %s settled: %s", payment.payment_id, outcome, extra={"payment_id": payment.payment_id})


async def on_payment_refunded(uow: UnitOfWork, event: InboundEvent) -> None:
    refund = _payload(PaymentRefunded, event)
    try:
        outcome = await service.refund_payment(uow=uow, tenant_id=_tenant(event), event_id=event.id, refund=refund)
    except service.PaymentContractViolation as exc:
        raise UnusableEvent(str(exc)) from None
    log.info("payment %s refund %s: %s", refund.payment_id, refund.refund_id, outcome,
             extra={"payment_id": refund.payment_id})


async def _on_payment_closed(uow: UnitOfWork, event: InboundEvent, *, cancelled: bool) -> None:
    payment = _payload(PaymentClosed, event)
    outcome = await service.close_payment(uow=uow, tenant_id=_tenant(event), event_id=event.id, payment=payment,
                                          cancelled=cancelled)
    log.info("payment %s %s: %s", payment.payment_id, "cancelled" if cancelled else "failed", outcome,
             extra={"payment_id": payment.payment_id})


async def on_payment_failed(uow: UnitOfWork, event: InboundEvent) -> None:
    await _on_payment_closed(uow, event, cancelled=False)


async def on_payment_cancelled(uow: UnitOfWork, event: InboundEvent) -> None:
    await _on_payment_closed(uow, event, cancelled=True)


HANDLERS = {
    "payment.approved.v1": on_payment_approved,
    "payment.settled.v1": on_payment_settled,
    "payment.failed.v1": on_payment_failed,
    "payment.cancelled.v1": on_payment_cancelled,
    "payment.refunded.v1": on_payment_refunded,
}


class HoldExpiry:
    """Voids expired holds, a batch per transaction, every `interval_s` (at once again
    while batches come back full). Several replicas may run: each skips the holds
    another has locked. It never stops on an error; it logs it and tries again."""

    name = "ledger-hold-expiry"

    def __init__(self, *, sessionmaker, interval_s: float = 1.0, batch_size: int = 100) -> None:
        self._sessionmaker = sessionmaker
        self._interval_s = interval_s
        self._batch_size = batch_size

    async def run_once(self) -> int:
        token = context.start(actor="job:ledger-hold-expiry", correlation_id=uuid.uuid4().hex)
        try:
            return await run_in_transaction(
                self._sessionmaker, lambda uow: service.expire_holds(uow=uow, limit=self._batch_size))
        finally:
            context.reset(token)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if await self.run_once() == self._batch_size:
                    continue
            except Exception:  # a job that dies silently is worse than one that logs and retries
                log.exception("hold expiry failed; retrying in %.1fs", self._interval_s)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self._interval_s)
            except asyncio.TimeoutError:
                pass


def build_consumers(*, settings, sessionmaker) -> list[Consumer | HoldExpiry]:
    return [
        Consumer(name=CONSUMER_NAME, service=settings.service_name, topics=[PAYMENTS_TOPIC], handlers=HANDLERS,
                 sessionmaker=sessionmaker, bootstrap=settings.kafka_bootstrap_servers,
                 max_attempts=settings.consumer_max_attempts, batch_size=settings.consumer_batch_size),
        HoldExpiry(sessionmaker=sessionmaker, interval_s=settings.hold_expiry_interval_s,
                   batch_size=settings.hold_expiry_batch_size),
    ]
