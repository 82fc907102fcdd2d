"""Event handlers of the approvals service.

`payment.created.v1` opens the payment's approval request (granted at once by the policy,
or pending). Handlers run inside the inbox's unit of work and are idempotent twice over:
the inbox skips a redelivered event id, and one request per (tenant, subject) makes a
second payment.created for the same payment (another event id) a no-op.

A handler here must never decide on behalf of a person, and never swallow a payment.created
it cannot evaluate: that one raises, is retried and is parked in the DLQ for a person.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.approvals import service
from services.approvals.settings import Settings
from shared.envelope import InboundEvent
from shared.inbox import Bound, Consumer, Delivery
from shared.uow import UnitOfWork

PAYMENT_CREATED = "payment.created.v1"


def payment_created_handler(settings: Settings, policies: service.PolicyCache):
    async def on_payment_created(uow: UnitOfWork, event: InboundEvent) -> None:
        await service.open_for_payment(uow=uow, tenant_id=event.tenant_id, actor=event.actor, payload=event.data,
                                       default_expire_after_s=settings.approval_expire_after_s, policies=policies)

    return on_payment_created


def payments_created_handler(settings: Settings, policies: service.PolicyCache):
    """The same for a run of payment.created messages (one statement for the run)."""

    async def on_payments_created(uow: UnitOfWork, deliveries: list[Delivery], bound: Bound) -> None:
        await service.open_for_payments(uow=uow, deliveries=deliveries, bound=bound,
                                        default_expire_after_s=settings.approval_expire_after_s, policies=policies)

    return on_payments_created


def build_consumers(*, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> list[Consumer]:
    """The payment.created consumer. (The consumer process also runs `jobs.run_jobs`.)"""
    policies = service.PolicyCache()
    consumer = Consumer(
        name=settings.approvals_consumer_group,
        service=settings.service_name,
        topics=[settings.payments_topic],
        handlers={PAYMENT_CREATED: payment_created_handler(settings, policies)},
        batch_handlers={PAYMENT_CREATED: payments_created_handler(settings, policies)},
        sessionmaker=sessionmaker,
        bootstrap=settings.kafka_bootstrap_servers,
        max_attempts=settings.consumer_max_attempts,
        batch_size=settings.consumer_batch_size,
    )
    return [consumer]
