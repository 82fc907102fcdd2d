"""Request and response models of the payments API, and the payload schemas of the
events it publishes (`EVENT_SCHEMAS`, for the event catalogue).

Validation is strict: unknown fields are refused, amounts are integers (never "12" or
12.0), text may not carry control characters, an IBAN must pass its country's length and
the mod-97 check. Responses carry payee data masked, always; plaintext never leaves the
service except to the processor.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, Strict, StringConstraints

from services.payments.domain import (
    Payment, PaymentStatus, Refund, RefundStatus, check_text, normalize_iban,
)
from shared.money import AmountMinor, CurrencyCode


def _text(max_length: int) -> type[str]:
    return Annotated[str, Strict(), StringConstraints(min_length=1, max_length=max_length), AfterValidator(check_text)]


Name = _text(140)  # ISO 20022 Max140Text
Reference = _text(140)
Reason = _text(500)
MetadataKey = Annotated[str, Strict(), StringConstraints(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.:-]+$")]
MetadataValue = Annotated[str, Strict(), StringConstraints(max_length=500), AfterValidator(check_text)]
AccountId = Annotated[str, Strict(), StringConstraints(min_length=1, max_length=64,
                                                       pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")]
Iban = Annotated[str, Strict(), StringConstraints(min_length=15, max_length=42), AfterValidator(normalize_iban),
                 Field(description="IBAN, compact or in groups of four; checked against its country's length and "
                                   "the ISO 7064 mod-97 check digits", examples=["DE89370400440532013000"])]


def _metadata_size(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 20:
        raise ValueError("metadata holds at most 20 keys")
    return value


Metadata = Annotated[dict[MetadataKey, MetadataValue], AfterValidator(_metadata_size)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ── requests ─────────────────────────────────────────────────────────────────────────


class PayeeCreate(_Strict):
    name: Name
    iban: Iban


class PaymentCreate(_Strict):
    amount: AmountMinor
    currency: CurrencyCode
    debit_account_id: AccountId
    payee: PayeeCreate
    reference: Reference
    metadata: Metadata = Field(default_factory=dict)


class PaymentCancel(_Strict):
    reason: Reason | None = None


class RefundCreate(_Strict):
    amount: AmountMinor | None = Field(default=None, description="Minor units; the whole refundable rest if absent")
    reason: Reason | None = None


# ── responses ────────────────────────────────────────────────────────────────────────


class PayeePublic(BaseModel):
    name: str = Field(description="Masked: initials only")
    iban: str = Field(description="Masked: country, check digits and the last four characters")


class PaymentPublic(BaseModel):
    id: uuid.UUID
    object: Literal["payment"] = "payment"
    status: PaymentStatus
    amount: int
    currency: str
    debit_account_id: str
    reference: str
    payee: PayeePublic
    metadata: dict[str, str]
    failure_reason: str | None
    cancellation_reason: str | None
    approval_id: str | None
    hold_id: str | None
    processor: str | None
    processor_payment_id: str | None
    value_date: date | None
    refunded_amount: int
    created_by: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, payment: Payment) -> PaymentPublic:
        return cls(
            id=payment.id, status=payment.status, amount=payment.amount, currency=payment.currency,
            debit_account_id=payment.debit_account_id, reference=payment.reference,
            payee=PayeePublic(name=payment.payee_name_masked, iban=payment.payee_iban_masked),
            metadata=payment.metadata, failure_reason=payment.failure_reason,
            cancellation_reason=payment.cancellation_reason, approval_id=payment.approval_id,
            hold_id=payment.hold_id, processor=payment.processor, processor_payment_id=payment.processor_payment_id,
            value_date=payment.value_date, refunded_amount=payment.refunded_amount, created_by=payment.created_by,
            created_at=payment.created_at, updated_at=payment.updated_at,
        )


class PaymentList(BaseModel):
    data: list[PaymentPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class RefundPublic(BaseModel):
    id: uuid.UUID
    object: Literal["refund"] = "refund"
    payment_id: uuid.UUID
    status: RefundStatus
    amount: int
    currency: str
    reason: str | None
    failure_reason: str | None
    processor_refund_id: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, refund: Refund) -> RefundPublic:
        return cls(id=refund.id, payment_id=refund.payment_id, status=refund.status, amount=refund.amount,
                   currency=refund.currency, reason=refund.reason, failure_reason=refund.failure_reason,
                   processor_refund_id=refund.processor_refund_id, created_by=refund.created_by,
                   created_at=refund.created_at, updated_at=refund.updated_at)


class RefundList(BaseModel):
    data: list[RefundPublic]


class StatusChange(BaseModel):
    event_id: uuid.UUID
    type: str
    status: str | None = Field(description="The payment's (or refund's) status after this event")
    refund_id: uuid.UUID | None
    actor: str
    reason: str | None
    correlation_id: str | None
    occurred_at: datetime


class PaymentHistory(BaseModel):
    payment_id: uuid.UUID
    data: list[StatusChange]


class WebhookAck(BaseModel):
    received: bool = True
    outcome: str


def _plausible_instant(value: datetime) -> datetime:
    # Far-off years overflow on the way to UTC or the database; no payment lives there.
    if not 1970 <= value.year <= 9000:
        raise ValueError("a timestamp between the years 1970 and 9000 is expected")
    return value


Instant = Annotated[AwareDatetime, AfterValidator(_plausible_instant)]


class ListFilters(BaseModel):
    """Query parameters of `GET /v1/payments`."""

    model_config = ConfigDict(extra="ignore")

    status: PaymentStatus | None = None
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=200)
    created_gte: Instant | None = Field(default=None, description="RFC 3339; payments created at or after")
    created_lt: Instant | None = Field(default=None, description="RFC 3339; payments created before")


# ── event payloads (docs/events.md) ──────────────────────────────────────────────────


class _Event(BaseModel):
    payment_id: uuid.UUID
    status: str


class MaskedPayee(BaseModel):
    name: str
    iban: str


class PaymentCreatedV1(_Event):
    amount: int
    currency: str
    debit_account_id: str
    reference: str
    payee: MaskedPayee
    created_by: str
    metadata: dict[str, str]


class PaymentApprovedV1(_Event):
    amount: int
    currency: str
    debit_account_id: str
    approval_id: str


class PaymentRejectedV1(_Event):
    approval_id: str
    reason: Literal["rejected", "expired"]


class PaymentFundsReservedV1(_Event):
    hold_id: str
    amount: int
    currency: str
    debit_account_id: str


class PaymentSubmittedV1(_Event):
    amount: int
    currency: str
    processor: str
    processor_payment_id: str


class PaymentSettledV1(_Event):
    amount: int
    currency: str
    debit_account_id: str
    processor_payment_id: str
    value_date: date
    hold_id: str | None


class PaymentFailedV1(_Event):
    amount: int
    currency: str
    debit_account_id: str
    failure_reason: str
    hold_id: str | None


class PaymentCancelledV1(_Event):
    amount: int
    currency: str
    debit_account_id: str
    reason: str | None
    hold_id: str | None


class PaymentRefundedV1(_Event):
    refund_id: uuid.UUID
    amount: int
    currency: str
    debit_account_id: str
    refunded_total: int


class _RefundEvent(BaseModel):
    refund_id: uuid.UUID
    payment_id: uuid.UUID
    amount: int
    currency: str
    status: str


class RefundCreatedV1(_RefundEvent):
    reason: str | None
    created_by: str


class RefundSubmittedV1(_RefundEvent):
    processor_refund_id: str


class RefundSucceededV1(_RefundEvent):
    pass


class RefundFailedV1(_RefundEvent):
    failure_reason: str


EVENT_SCHEMAS: dict[str, type[BaseModel]] = {
    "payment.created.v1": PaymentCreatedV1,
    "payment.approved.v1": PaymentApprovedV1,
    "payment.rejected.v1": PaymentRejectedV1,
    "payment.funds_reserved.v1": PaymentFundsReservedV1,
    "payment.submitted.v1": PaymentSubmittedV1,
    "payment.settled.v1": PaymentSettledV1,
    "payment.failed.v1": PaymentFailedV1,
    "payment.cancelled.v1": PaymentCancelledV1,
    "payment.refunded.v1": PaymentRefundedV1,
    "refund.created.v1": RefundCreatedV1,
    "refund.submitted.v1": RefundSubmittedV1,
    "refund.succeeded.v1": RefundSucceededV1,
    "refund.failed.v1": RefundFailedV1,
}


# ── events consumed (docs/events.md): only the fields relied on ──────────────────────


class _Inbound(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ApprovalDecided(_Inbound):
    approval_id: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    subject_type: str | None = None
    payment_id: uuid.UUID | None = None
    subject_id: str | None = None


class HoldPlaced(_Inbound):
    hold_id: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    payment_id: uuid.UUID


class HoldVoided(_Inbound):
    hold_id: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    payment_id: uuid.UUID
    reason: Annotated[str, StringConstraints(max_length=200)] | None = None


class HoldRejected(_Inbound):
    payment_id: uuid.UUID
    reason: Annotated[str, StringConstraints(min_length=1, max_length=100)]
