"""HTTP API of the sandbox processor (`create_app()`; port 8010 under `clearhouse up`).

    POST /v1/payouts                        Idempotency-Key required; 201 new, 200 replayed
    GET  /v1/payouts/{id}
    GET  /v1/payouts/by-request/{request_id}   what the janitor asks: "did you get this?"
    POST /v1/refunds                        Idempotency-Key required
    GET  /v1/refunds/{id} | /v1/refunds/by-request/{request_id}
    GET  /statements/{YYYY-MM-DD}.csv
    GET  /statements/{YYYY-MM-DD}.camt053.xml
    GET  /healthz, /readyz

Errors are problem+json with a stable `code`, like every Clearhouse API. When an API key
is configured every route but /healthz needs `Authorization: Bearer <key>`. Triggers and
lifecycle: see `processor.py`.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import date, datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

from services.sandbox.processor import Created, SandboxProcessor, SandboxRefusal
from services.sandbox.settings import Settings
from services.sandbox.statements import render_camt053, render_csv
from shared.errors import DomainError, NotFound, Unauthorized, install_problem_handlers, problem_response
from shared.logs import setup_logging
from shared.money import AmountMinor, CurrencyCode
from shared.redaction import is_valid_iban

log = logging.getLogger(__name__)

Text140 = Annotated[str, StringConstraints(min_length=1, max_length=140)]
ObjectId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
IdempotencyKey = Annotated[str, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                       pattern=r"^[\x21-\x7e]+$")]


def _iban(value: str) -> str:
    if not is_valid_iban(value):
        raise ValueError("not a valid IBAN")
    return value


class Creditor(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Text140
    iban: Annotated[str, StringConstraints(min_length=15, max_length=42), AfterValidator(_iban)]


class PayoutIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    amount: AmountMinor
    currency: CurrencyCode
    creditor: Creditor
    reference: Text140
    # The caller's id for this payment, quoted back on statements (Clearhouse: the
    # payment id, 36 characters; ISO 20022 says Max35Text, see docs/payments.md).
    end_to_end_id: Annotated[str, StringConstraints(min_length=1, max_length=36, pattern=r"^[\x21-\x7e]+$")]


class RefundIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    payout_id: ObjectId
    amount: AmountMinor
    currency: CurrencyCode
    end_to_end_id: Annotated[str, StringConstraints(min_length=1, max_length=36, pattern=r"^[\x21-\x7e]+$")]


class NoSuchObject(NotFound):
    code = "resource_missing"
    title = "No such object"


class InvalidApiKey(Unauthorized):
    code = "invalid_api_key"
    title = "Invalid API key"


def _statement_day(value: str) -> date:
    try:
        if len(value) != 10:
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise NoSuchObject("A statement is named by its value date, YYYY-MM-DD.") from None


def create_app(settings: Settings | None = None, *, clock: Callable[[], float] = time.time) -> FastAPI:
    settings = settings or Settings()
    setup_logging(settings.service_name, level=settings.log_level, role="api")
    processor = SandboxProcessor(settings, clock=clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await processor.start()
        try:
            yield
        finally:
            await processor.stop()

    def authorised(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expected = settings.api_key.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise InvalidApiKey("A valid sandbox API key is required.")

    app = FastAPI(title="Clearhouse sandbox processor", version="1", lifespan=lifespan)
    app.state.processor = processor
    install_problem_handlers(app)

    @app.exception_handler(SandboxRefusal)
    async def refused(request: Request, exc: SandboxRefusal) -> Response:
        return problem_response(exc.status, code=exc.code, detail=exc.detail)

    api = APIRouter(dependencies=[Depends(authorised)])

    def answer(created: Created, response: Response) -> dict:
        response.status_code = 200 if created.replayed else 201
        return created.body

    @api.post("/v1/payouts", status_code=201)
    async def create_payout(body: PayoutIn, key: IdempotencyKey, response: Response) -> dict:
        return answer(await processor.create_payout(request_id=key, body=body.model_dump()), response)

    @api.get("/v1/payouts/by-request/{request_id}")
    async def payout_by_request(request_id: Annotated[str, Path(max_length=255)]) -> dict:
        return processor.payout_by_request(request_id) or _missing()

    @api.get("/v1/payouts/{payout_id}")
    async def get_payout(payout_id: Annotated[str, Path(max_length=64)]) -> dict:
        return processor.payout(payout_id) or _missing()

    @api.post("/v1/refunds", status_code=201)
    async def create_refund(body: RefundIn, key: IdempotencyKey, response: Response) -> dict:
        return answer(await processor.create_refund(request_id=key, body=body.model_dump()), response)

    @api.get("/v1/refunds/by-request/{request_id}")
    async def refund_by_request(request_id: Annotated[str, Path(max_length=255)]) -> dict:
        return processor.refund_by_request(request_id) or _missing()

    @api.get("/v1/refunds/{refund_id}")
    async def get_refund(refund_id: Annotated[str, Path(max_length=64)]) -> dict:
        return processor.refund(refund_id) or _missing()

    @api.get("/statements/{day}.csv")
    async def statement_csv(day: str) -> Response:
        value_date = _statement_day(day)
        body = render_csv(processor.booked_entries(up_to=value_date), value_date)
        return Response(body, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="sandbox-{value_date}.csv"'})

    @api.get("/statements/{day}.camt053.xml")
    async def statement_camt053(day: str) -> Response:
        value_date = _statement_day(day)
        body = render_camt053(processor.booked_entries(up_to=value_date), value_date,
                              account_id=settings.account_id,
                              created_at=datetime.fromtimestamp(clock(), timezone.utc))
        return Response(body, media_type="application/xml",
                        headers={"Content-Disposition": f'attachment; filename="sandbox-{value_date}.camt053.xml"'})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict:
        # The sandbox has no dependency beyond its own state file, opened at start-up.
        return {"status": "ready"}

    app.include_router(api)
    return app


def _missing() -> dict:
    raise NoSuchObject("No such object.")


__all__ = ["create_app", "DomainError"]
