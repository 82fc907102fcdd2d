"""Processor connectors: the one seam between Clearhouse and whoever moves the money.

Each processor gets a `Connector` (Hyperswitch's connector abstraction, in small): it
sends payouts and refunds under *our* request id as the processor's idempotency key,
looks them up again by that id, and turns the processor's signed webhooks into
`ProcessorUpdate`s in Clearhouse's vocabulary (processing | succeeded | failed, plus a
stable failure reason). Everything processor-specific (paths, status names, failure
codes, signature scheme) stays inside its connector; the rest of the service never sees
it.

Errors are sorted by what the caller may do next:
  ProcessorRejected     the processor refused the request for good: nothing was moved
  ProcessorUnavailable  no answer we can trust (network, timeout, 5xx, 429): retry with the
                        same request id; the processor may or may not have it
  WebhookRejected       a webhook whose signature or timestamp does not verify (401)
  WebhookMalformed      a verified webhook we cannot read (400)

A connector must never log or put in an exception the payee's plaintext, and never
retry by itself: retries, backoff and the circuit breaker belong to the jobs, which see
every processor call.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Literal, Protocol

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.payments.domain import FailureReason, ProcessorState

Kind = Literal["payout", "refund"]
SIGNATURE_HEADER = "Clearhouse-Signature"


# ── what goes in, what comes out ──────────────────────────────────────────────────────


@dataclass(frozen=True)
class PayoutRequest:
    request_id: uuid.UUID
    payment_id: uuid.UUID
    amount: int
    currency: str
    payee_name: str
    payee_iban: str
    reference: str

    def __repr__(self) -> str:  # never the payee's plaintext in a log or traceback
        return f"PayoutRequest(request_id={self.request_id}, payment_id={self.payment_id})"


@dataclass(frozen=True)
class RefundRequest:
    request_id: uuid.UUID
    payment_id: uuid.UUID
    refund_id: uuid.UUID
    processor_payment_id: str
    amount: int
    currency: str


@dataclass(frozen=True)
class ProcessorObject:
    """A payout or refund as the processor reports it."""

    kind: Kind
    processor_object_id: str
    request_id: uuid.UUID | None
    state: ProcessorState
    failure_reason: str | None = None
    value_date: date | None = None


@dataclass(frozen=True)
class ProcessorUpdate:
    """One webhook (or one poll answer) about one payout or refund."""

    processor: str
    event_id: str  # the processor's event id: deduplication key
    event_type: str
    object: ProcessorObject


class ProcessorRejected(Exception):
    def __init__(self, *, code: str, failure_reason: str) -> None:
        super().__init__(f"processor refused the request: {code}")
        self.code = code
        self.failure_reason = failure_reason


class ProcessorUnavailable(Exception):
    """`maybe_received`: the request may have reached the processor (timeout, 5xx)."""

    def __init__(self, detail: str, *, maybe_received: bool) -> None:
        super().__init__(detail)
        self.maybe_received = maybe_received


class WebhookRejected(Exception):
    pass


class WebhookMalformed(Exception):
    pass


class Connector(Protocol):
    name: str

    async def create_payout(self, request: PayoutRequest) -> ProcessorObject: ...

    async def create_refund(self, request: RefundRequest) -> ProcessorObject: ...

    async def find(self, *, kind: Kind, request_id: uuid.UUID) -> ProcessorObject | None:
        """The object sent under `request_id`, or None if the processor never received it."""
        ...

    def parse_webhook(self, *, headers: Mapping[str, str], body: bytes, now: float) -> ProcessorUpdate: ...

    async def aclose(self) -> None: ...


# ── webhook signatures (Stripe's scheme) ─────────────────────────────────────────────


def sign(secret: bytes, *, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: bytes, *, header: str | None, body: bytes, now: float, tolerance_s: int) -> None:
    """`t=<unix>,v1=<hex>[,v1=<hex>...]`: HMAC-SHA256 over "<t>." + body, compared in
    constant time, with `t` within the tolerance of our clock either way (a replayed
    capture is refused once it is older than that)."""
    if not header or len(header) > 1024:
        raise WebhookRejected("missing signature header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookRejected("signature header lacks t= or v1=")
    if abs(now - timestamp) > tolerance_s:
        raise WebhookRejected("signature timestamp outside the tolerance")
    expected = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest().encode()
    # Compare every candidate (no early exit) so timing says nothing about which matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate.encode("ascii", "replace"))
    if not matched:
        raise WebhookRejected("signature does not match")


# ── the sandbox processor ────────────────────────────────────────────────────────────

# ISO 20022 reason codes the sandbox (like a SEPA processor) reports.
SANDBOX_FAILURES = {
    "AM04": FailureReason.PROCESSOR_INSUFFICIENT_FUNDS,
    "AC04": FailureReason.PAYEE_ACCOUNT_CLOSED,
    "AC01": FailureReason.PAYEE_ACCOUNT_INVALID,
}
SANDBOX_REJECTIONS = {"invalid_creditor_account": FailureReason.PAYEE_ACCOUNT_INVALID}
_STATES = {
    "pending": ProcessorState.PROCESSING, "processing": ProcessorState.PROCESSING,
    "settled": ProcessorState.SUCCEEDED, "succeeded": ProcessorState.SUCCEEDED, "failed": ProcessorState.FAILED,
}
# 408/409/425/429 say "not now", not "never": the request may be retried.
_RETRYABLE_4XX = {408, 409, 425, 429}


class _SandboxObject(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=100)
    object: Literal["payout", "refund"]
    request_id: str | None = Field(default=None, max_length=100)
    status: Literal["pending", "processing", "settled", "succeeded", "failed"]
    failure_code: str | None = Field(default=None, max_length=50)
    value_date: date | None = None


class _SandboxEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=100)
    type: str = Field(min_length=1, max_length=100)
    data: dict


class SandboxConnector:
    name = "sandbox"

    def __init__(self, *, base_url: str, webhook_secret: bytes, api_key: str | None = None,
                 timeout_s: float = 5.0, tolerance_s: int = 300) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout_s = timeout_s
        self._http: httpx.AsyncClient | None = None  # made on first call: the API only verifies webhooks
        self._secret = webhook_secret
        self._tolerance_s = tolerance_s

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self._base_url, timeout=self._timeout_s, headers=self._headers)
        return self._http

    async def create_payout(self, request: PayoutRequest) -> ProcessorObject:
        body = {
            "amount": request.amount, "currency": request.currency,
            "creditor": {"name": request.payee_name, "iban": request.payee_iban},
            "reference": request.reference,
            # The payment id travels as the end-to-end reference: statements quote it.
            "end_to_end_id": str(request.payment_id),
        }
        return await self._create("/v1/payouts", body, request.request_id)

    async def create_refund(self, request: RefundRequest) -> ProcessorObject:
        body = {"payout_id": request.processor_payment_id, "amount": request.amount, "currency": request.currency,
                "end_to_end_id": str(request.refund_id)}
        return await self._create("/v1/refunds", body, request.request_id)

    async def find(self, *, kind: Kind, request_id: uuid.UUID) -> ProcessorObject | None:
        path = f"/v1/{kind}s/by-request/{request_id}"
        response = await self._send("GET", path)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ProcessorUnavailable(f"GET {path} answered {response.status_code}", maybe_received=True)
        return self._object(response)

    async def _create(self, path: str, body: dict, request_id: uuid.UUID) -> ProcessorObject:
        response = await self._send("POST", path, content=orjson.dumps(body),
                                    headers={"Idempotency-Key": str(request_id), "Content-Type": "application/json"})
        status = response.status_code
        if status in (200, 201):
            return self._object(response)
        if 400 <= status < 500 and status not in _RETRYABLE_4XX:
            code = _error_code(response)
            raise ProcessorRejected(code=code, failure_reason=SANDBOX_REJECTIONS.get(code,
                                                                                     FailureReason.PROCESSOR_REJECTED))
        raise ProcessorUnavailable(f"POST {path} answered {status}", maybe_received=status >= 500 or status == 409)

    async def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return await self._client().request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ProcessorUnavailable(f"{method} {path}: cannot connect ({type(exc).__name__})",
                                       maybe_received=False) from None
        except httpx.HTTPError as exc:  # timeouts, resets: the request may have arrived
            raise ProcessorUnavailable(f"{method} {path}: {type(exc).__name__}", maybe_received=True) from None

    def _object(self, response: httpx.Response) -> ProcessorObject:
        try:
            return _to_object(_SandboxObject.model_validate_json(response.content))
        except (ValidationError, ValueError) as exc:
            raise ProcessorUnavailable(f"unreadable processor answer ({type(exc).__name__})",
                                       maybe_received=True) from None

    def parse_webhook(self, *, headers: Mapping[str, str], body: bytes, now: float) -> ProcessorUpdate:
        verify_signature(self._secret, header=headers.get(SIGNATURE_HEADER.lower()) or headers.get(SIGNATURE_HEADER),
                         body=body, now=now, tolerance_s=self._tolerance_s)
        try:
            event = _SandboxEvent.model_validate_json(body)
            found = _SandboxObject.model_validate(event.data.get("object"))
        except (ValidationError, ValueError):
            raise WebhookMalformed("the webhook body is not a sandbox event") from None
        return ProcessorUpdate(processor=self.name, event_id=event.id, event_type=event.type, object=_to_object(found))


def _to_object(found: _SandboxObject) -> ProcessorObject:
    try:
        request_id = uuid.UUID(found.request_id) if found.request_id else None
    except ValueError:
        request_id = None  # not one of ours: the update will be recorded as unmatched
    state = _STATES[found.status]
    failure = None
    if state is ProcessorState.FAILED:
        failure = SANDBOX_FAILURES.get(found.failure_code or "", FailureReason.PROCESSOR_DECLINED)
    return ProcessorObject(kind=found.object, processor_object_id=found.id, request_id=request_id, state=state,
                           failure_reason=failure, value_date=found.value_date)


def _error_code(response: httpx.Response) -> str:
    """The stable `code` of the processor's problem+json answer."""
    try:
        code = orjson.loads(response.content)["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"http_{response.status_code}"
    return code if isinstance(code, str) and code.isascii() and len(code) <= 50 else f"http_{response.status_code}"


def build_connectors(settings) -> dict[str, Connector]:
    """Every processor this deployment can send to, by name (the webhook path names it)."""
    return {
        "sandbox": SandboxConnector(
            base_url=settings.sandbox_url, webhook_secret=settings.webhook_secret(),
            api_key=settings.sandbox_api_key.get_secret_value() if settings.sandbox_api_key else None,
            timeout_s=settings.processor_timeout_s, tolerance_s=settings.webhook_tolerance_s,
        ),
    }


DEFAULT_PROCESSOR = "sandbox"
