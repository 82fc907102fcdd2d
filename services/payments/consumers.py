"""Event handlers of the payments service: what approvals and the ledger tell it.

    approvals.events  approval.granted.v1   pending_approval → approved (payment.approved)
                      approval.rejected.v1  pending_approval → rejected (payment.rejected)
                      approval.expired.v1   pending_approval → rejected (payment.rejected)
    ledger.events     ledger.hold.placed.v1    funds reserved; a submission attempt is queued
                      ledger.hold.rejected.v1  approved → failed (failure_reason from the ledger)
                      ledger.hold.voided.v1    approved, never sent → failed (hold_expired): a
                                               payment whose reservation is gone never leaves

Each handler runs in the inbox's transaction (at most once per event id) and is also
idempotent on its business key: it acts only if the payment is still in the state the
event moves it from, so the same fact arriving under another id changes nothing. A
payload we cannot read is a poison message: it raises and ends in the DLQ. Other event
types on these topics are recorded as ignored by the inbox.
"""

from __future__ import annotations

from pydantic import ValidationError

from services.payments import jobs, service
from services.payments.schemas import ApprovalDecided, HoldPlaced, HoldRejected, HoldVoided
from shared.envelope import InboundEvent
from shared.inbox import Consumer
from shared.uow import UnitOfWork


class UnreadableEvent(ValueError):
    """The payload lacks what docs/events.md promises: retried, then dead-lettered."""


def _read(model, event: InboundEvent):
    try:
        return model.model_validate(event.data)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
        raise UnreadableEvent(f"{event.type} {event.id}: unreadable fields {fields}") from None


async def on_approval_granted(uow: UnitOfWork, event: InboundEvent) -> None:
    await service.record_approval_granted(uow=uow, tenant_id=event.tenant_id,
                                          decided=_read(ApprovalDecided, event), actor=event.actor)


async def on_approval_rejected(uow: UnitOfWork, event: InboundEvent) -> None:
    await service.record_approval_declined(uow=uow, tenant_id=event.tenant_id, decided=_read(ApprovalDecided, event),
                                           expired=False, actor=event.actor)


async def on_approval_expired(uow: UnitOfWork, event: InboundEvent) -> None:
    await service.record_approval_declined(uow=uow, tenant_id=event.tenant_id, decided=_read(ApprovalDecided, event),
                                           expired=True, actor=event.actor)


async def on_hold_placed(uow: UnitOfWork, event: InboundEvent) -> None:
    await service.record_hold_placed(uow=uow, tenant_id=event.tenant_id, hold=_read(HoldPlaced, event))
    uow.after_commit(jobs.submissions_due)  # this process's submitter sends it now, not at its next poll


async def on_hold_rejected(uow: UnitOfWork, event: InboundEvent) -> None:
    await service.record_hold_rejected(uow=uow, tenant_id=event.tenant_id, refusal=_read(HoldRejected, event))


async def on_hold_voided(uow: UnitOfWork, event: InboundEvent) -> None:
    await service.record_hold_voided(uow=uow, tenant_id=event.tenant_id, voided=_read(HoldVoided, event))


HANDLERS = {
    "approval.granted.v1": on_approval_granted,
    "approval.rejected.v1": on_approval_rejected,
    "approval.expired.v1": on_approval_expired,
    "ledger.hold.placed.v1": on_hold_placed,
    "ledger.hold.rejected.v1": on_hold_rejected,
    "ledger.hold.voided.v1": on_hold_voided,
}


def build_consumers(*, settings, sessionmaker) -> list[Consumer]:
    return [
        Consumer(
            name=settings.consumer_group,
            service=settings.service_name,
            topics=[settings.approvals_topic, settings.ledger_topic],
            handlers=HANDLERS,
            sessionmaker=sessionmaker,
            bootstrap=settings.kafka_bootstrap_servers,
            max_attempts=settings.consumer_max_attempts,
            batch_size=settings.consumer_batch_size,
        )
    ]
