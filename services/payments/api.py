"""HTTP API of the payments service. Routes are thin: parse, authorise, call one use case,
map the result.

    POST /v1/payments                               payments:write   201 payment (Idempotency-Key)
    GET  /v1/payments?status&created_gte&created_lt&limit&cursor     payments:read
    GET  /v1/payments/{id}                          payments:read
    GET  /v1/payments/{id}/history                  payments:read    status changes with actor and reason
    POST /v1/payments/{id}/cancel                   payments:write   (Idempotency-Key)
    POST /v1/payments/{id}/refunds                  payments:write   201 refund (Idempotency-Key)
    GET  /v1/payments/{id}/refunds[/{refund_id}]    payments:read
    POST /v1/payments/webhooks/{processor}          public: verified by the processor's signature

Every route but the webhook needs the gateway's internal token (the kit enforces it);
every query is scoped to the token's tenant, so another tenant's payment is a 404. Payee
data in responses is always masked.
"""

from __future__ import annotations

import time
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request, Response
from prometheus_client import Counter

from services.payments import service
from services.payments.connector import WebhookMalformed, WebhookRejected, build_connectors
from services.payments.crypto import cipher_from_settings
from services.payments.domain import PaymentNotCancellable, PaymentNotRefundable, RefundExceedsRefundable
from services.payments.schemas import (
    ListFilters, PaymentCancel, PaymentCreate, PaymentHistory, PaymentList, PaymentPublic, RefundCreate, RefundList,
    RefundPublic, StatusChange, WebhookAck,
)
from services.payments.settings import Settings
from shared.api import SessionmakerDep
from shared.auth import Principal, require_scope
from shared.errors import problem_responses
from shared.idempotency import IdempotencyDep, IdempotencyKeyInFlight, IdempotencyKeyReused, InvalidIdempotencyKey
from shared.service_app import build_service_app
from shared.uow import run_in_transaction

MIGRATIONS = FilePath(__file__).parent / "migrations"

WEBHOOKS = Counter("clearhouse_payments_webhooks_total", "Processor webhooks received, by outcome",
                   ["processor", "outcome"])

Reader = Annotated[Principal, Depends(require_scope("payments:read"))]
Writer = Annotated[Principal, Depends(require_scope("payments:write"))]

router = APIRouter(prefix="/v1/payments", tags=["payments"])
webhooks = APIRouter(prefix="/v1/payments/webhooks", tags=["processor webhooks"])

_AUTH = (401, 403)
_WRITE = (*_AUTH, InvalidIdempotencyKey, IdempotencyKeyInFlight, IdempotencyKeyReused)


def _cipher(request: Request):
    return request.app.state.payee_cipher


def _json(model) -> dict:
    return model.model_dump(mode="json")


def _location(payment: PaymentPublic) -> dict[str, str]:
    return {"Location": f"/v1/payments/{payment.id}"}


@router.post("", status_code=201, response_model=PaymentPublic, summary="Create a payment order",
             responses=problem_responses(400, 422, *_WRITE))
async def create_payment(body: PaymentCreate, principal: Writer, idem: IdempotencyDep,
                         sessionmaker: SessionmakerDep, request: Request) -> Response:
    cipher = _cipher(request)

    async def use_case(uow) -> PaymentPublic:
        payment = await service.create_payment(uow=uow, cipher=cipher, tenant_id=principal.tenant_id,
                                               created_by=principal.principal, request=body)
        return PaymentPublic.of(payment)

    return await idem.run(sessionmaker, use_case, status_code=201, headers=_location, serialize=_json)


@router.get("", response_model=PaymentList, summary="List payments, newest first",
            responses=problem_responses(400, 422, *_AUTH, service.InvalidCursor))
async def list_payments(filters: Annotated[ListFilters, Query()], principal: Reader,
                        sessionmaker: SessionmakerDep) -> PaymentList:
    async with sessionmaker() as session:
        page, next_cursor = await service.list_payments(session=session, tenant_id=principal.tenant_id,
                                                        filters=filters)
    return PaymentList(data=[PaymentPublic.of(p) for p in page], next_cursor=next_cursor)


@router.get("/{payment_id}", response_model=PaymentPublic, summary="Get a payment",
            responses=problem_responses(*_AUTH, service.PaymentNotFound))
async def get_payment(payment_id: str, principal: Reader, sessionmaker: SessionmakerDep) -> PaymentPublic:
    async with sessionmaker() as session:
        payment = await service.get_payment(session=session, tenant_id=principal.tenant_id, payment_id=payment_id)
    return PaymentPublic.of(payment)


@router.get("/{payment_id}/history", response_model=PaymentHistory, summary="A payment's status changes",
            responses=problem_responses(*_AUTH, service.PaymentNotFound))
async def get_history(payment_id: str, principal: Reader, sessionmaker: SessionmakerDep) -> PaymentHistory:
    async with sessionmaker() as session:
        rows = await service.payment_history(session=session, tenant_id=principal.tenant_id, payment_id=payment_id)
    changes = [
        StatusChange(event_id=r.id, type=r.type, status=r.payload.get("status"),
                     refund_id=r.aggregate_id if r.aggregate_type == "refund" else None, actor=r.actor,
                     reason=r.reason, correlation_id=r.correlation_id, occurred_at=r.occurred_at)
        for r in rows
    ]
    return PaymentHistory(payment_id=service.parse_id(payment_id), data=changes)


@router.post("/{payment_id}/cancel", response_model=PaymentPublic, summary="Cancel a payment not yet submitted",
             responses=problem_responses(400, 422, *_WRITE, service.PaymentNotFound, PaymentNotCancellable))
async def cancel_payment(payment_id: str, principal: Writer, idem: IdempotencyDep, sessionmaker: SessionmakerDep,
                         body: Annotated[PaymentCancel | None, Body()] = None) -> Response:
    reason = body.reason if body else None

    async def use_case(uow) -> PaymentPublic:
        payment = await service.cancel_payment(uow=uow, tenant_id=principal.tenant_id, payment_id=payment_id,
                                               reason=reason)
        return PaymentPublic.of(payment)

    return await idem.run(sessionmaker, use_case, status_code=200, serialize=_json)


@router.post("/{payment_id}/refunds", status_code=201, response_model=RefundPublic,
             summary="Refund a settled payment, in full or in part",
             responses=problem_responses(400, 422, *_WRITE, service.PaymentNotFound, PaymentNotRefundable,
                                         RefundExceedsRefundable))
async def create_refund(payment_id: str, principal: Writer, idem: IdempotencyDep, sessionmaker: SessionmakerDep,
                        body: Annotated[RefundCreate | None, Body()] = None) -> Response:
    body = body or RefundCreate()

    async def use_case(uow) -> RefundPublic:
        refund = await service.request_refund(uow=uow, tenant_id=principal.tenant_id, payment_id=payment_id,
                                              amount=body.amount, reason=body.reason,
                                              created_by=principal.principal)
        return RefundPublic.of(refund)

    return await idem.run(sessionmaker, use_case, status_code=201,
                          headers=lambda r: {"Location": f"/v1/payments/{r.payment_id}/refunds/{r.id}"},
                          serialize=_json)


@router.get("/{payment_id}/refunds", response_model=RefundList, summary="A payment's refunds",
            responses=problem_responses(*_AUTH, service.PaymentNotFound))
async def list_refunds(payment_id: str, principal: Reader, sessionmaker: SessionmakerDep) -> RefundList:
    async with sessionmaker() as session:
        found = await service.list_refunds(session=session, tenant_id=principal.tenant_id, payment_id=payment_id)
    return RefundList(data=[RefundPublic.of(r) for r in found])


@router.get("/{payment_id}/refunds/{refund_id}", response_model=RefundPublic, summary="Get a refund",
            responses=problem_responses(*_AUTH, service.PaymentNotFound, service.RefundNotFound))
async def get_refund(payment_id: str, refund_id: str, principal: Reader, sessionmaker: SessionmakerDep) -> RefundPublic:
    async with sessionmaker() as session:
        refund = await service.get_refund(session=session, tenant_id=principal.tenant_id, payment_id=payment_id,
                                          refund_id=refund_id)
    return RefundPublic.of(refund)


@webhooks.post("/{processor}", response_model=WebhookAck, summary="Processor webhook (signed)",
               responses=problem_responses(service.MalformedWebhook, service.InvalidWebhookSignature,
                                           service.UnknownProcessor))
async def receive_webhook(processor: Annotated[str, Path(max_length=40)], request: Request,
                          sessionmaker: SessionmakerDep) -> WebhookAck:
    connector = request.app.state.connectors.get(processor)
    if connector is None:
        raise service.UnknownProcessor("No such processor.")
    body = await request.body()
    try:
        update = connector.parse_webhook(headers=request.headers, body=body, now=time.time())
    except WebhookRejected:
        WEBHOOKS.labels(processor, "forged").inc()
        # One answer for every verification failure: which check failed helps only a forger.
        raise service.InvalidWebhookSignature("The webhook signature or its timestamp does not verify.") from None
    except WebhookMalformed:
        WEBHOOKS.labels(processor, "malformed").inc()
        raise service.MalformedWebhook("The webhook is signed but not a readable event.") from None
    outcome = await run_in_transaction(sessionmaker, lambda uow: service.apply_processor_update(
        uow=uow, update=update, actor=f"webhook:{processor}"))
    WEBHOOKS.labels(processor, str(outcome)).inc()
    return WebhookAck(outcome=str(outcome))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = build_service_app(settings=settings, routers=[router], public_routers=[webhooks],
                            migrations_dir=MIGRATIONS)
    app.state.payee_cipher = cipher_from_settings(settings)
    app.state.connectors = build_connectors(settings)
    return app


__all__ = ["create_app", "MIGRATIONS"]
