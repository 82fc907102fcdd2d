"""Request and response models of the ledger API, the payloads of its events
(`EVENT_SCHEMAS`, the catalogue) and of the payment events it consumes.

Requests are strict: unknown fields, floats or strings for amounts, non-RFC 3339 times
and text PostgreSQL cannot store (NUL, lone surrogates) are refused with 422 here, so no
input reaches the database in a shape it would reject with an error. Field names of the
public contract (docs: ARCHITECTURE.md §6) are fixed; this module only adds fields.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StringConstraints, WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from shared.money import AmountMinor, CurrencyCode

# ── field types ─────────────────────────────────────────────────────────────────────


def _storable_text(value: str) -> str:
    # json.loads lets "\u0000" and lone surrogates through; PostgreSQL text refuses the
    # first and UTF-8 cannot encode the second. Control characters have no place in a
    # name or description either (log and statement injection).
    for char in value:
        category = unicodedata.category(char)
        if category in ("Cc", "Cs") and char not in "\t\n":
            raise PydanticCustomError("text_character", "Text may not contain control characters or lone surrogates")
    return value


def _text(max_length: int, min_length: int = 1) -> Any:
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length),
                     AfterValidator(_storable_text)]


Name = _text(200)
Description = _text(1000, min_length=0)
ExternalId = _text(255)
Reason = _text(200)
_METADATA_KEY = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,40}$")]
_METADATA_VALUE = _text(500, min_length=0)


def _bounded_metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 50:
        raise PydanticCustomError("metadata_size", "Metadata holds at most 50 keys")
    return value


# Stripe-style metadata: string keys and values only, so the canonical form hashed into
# the journal survives the round trip through jsonb exactly (no floats, no nesting).
Metadata = Annotated[dict[_METADATA_KEY, _METADATA_VALUE], AfterValidator(_bounded_metadata)]

_RFC3339 = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?([Zz]|[+\- ][0-9]{2}:[0-9]{2})"
)


def parse_rfc3339(value: object) -> datetime:
    """An RFC 3339 date-time with offset, as an aware UTC datetime. A space where the
    offset's '+' should be is read as '+': that is what an unencoded '+' in a query
    string turns into. Digits beyond microseconds are dropped (the ledger's precision)."""
    match = _RFC3339.fullmatch(value) if isinstance(value, str) and len(value) <= 40 else None
    if not match:
        raise PydanticCustomError("rfc3339", "Expected an RFC 3339 date-time with offset, e.g. 2025-01-31T12:00:00Z")
    date, clock, fraction, offset = match.groups()
    offset = "+00:00" if offset in ("Z", "z") else "+" + offset[1:] if offset[0] == " " else offset
    micro = f".{(fraction or '')[:6].ljust(6, '0')}"
    try:
        return datetime.fromisoformat(f"{date}T{clock}{micro}{offset}").astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise PydanticCustomError("rfc3339_range", "Not a valid date-time (out of range)") from None


Rfc3339 = Annotated[
    datetime,
    BeforeValidator(parse_rfc3339),  # a string only: no Unix timestamps, no naive times
    WithJsonSchema({"type": "string", "format": "date-time", "examples": ["2025-01-31T12:00:00Z"]}),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ── accounts ────────────────────────────────────────────────────────────────────────


class AccountCreate(_Strict):
    name: Name
    currency: CurrencyCode
    normal_balance: Literal["debit", "credit"] = Field(
        description="credit for money the tenant holds for someone (a customer wallet), debit for assets")
    allow_negative: StrictBool = False
    metadata: Metadata = Field(default_factory=dict)


class AccountPublic(BaseModel):
    id: uuid.UUID
    name: str
    currency: str
    normal_balance: Literal["debit", "credit"]
    allow_negative: bool
    kind: Literal["customer", "system"]
    system_code: Literal["payouts_in_transit", "funding"] | None
    metadata: dict[str, str]
    created_at: datetime


class AccountList(BaseModel):
    data: list[AccountPublic]
    next_cursor: str | None


class BalancePublic(BaseModel):
    account_id: uuid.UUID
    currency: str
    posted: int = Field(description="Balance of posted entries, in the account's normal direction")
    pending: int = Field(description="Posted plus every pending entry (the balance once all holds post)")
    available: int = Field(description="Posted minus pending outflows: what can be spent")
    as_of: datetime
    normal_balance: Literal["debit", "credit"]
    posted_debits: int
    posted_credits: int
    pending_debits: int
    pending_credits: int
    version: int = Field(description="Number of entries on the account up to as_of")


class BalanceAfter(BaseModel):
    posted: int
    pending: int
    available: int


class EntryPublic(BaseModel):
    transaction_id: uuid.UUID
    index: int = Field(description="Position of the entry in its transaction")
    account_id: uuid.UUID
    account_version: int = Field(description="1 for the account's first entry, then +1 per entry")
    direction: Literal["debit", "credit"]
    kind: Literal["posted", "pending", "released"]
    amount: int
    currency: str
    posted_at: datetime
    balance_after: BalanceAfter


class EntryList(BaseModel):
    data: list[EntryPublic]
    next_cursor: str | None


# ── transactions ────────────────────────────────────────────────────────────────────


class EntryCreate(_Strict):
    account_id: uuid.UUID
    direction: Literal["debit", "credit"]
    amount: AmountMinor
    currency: CurrencyCode | None = Field(default=None, description="Optional: refused if not the account's")


class TransactionCreate(_Strict):
    entries: list[EntryCreate] = Field(min_length=2, max_length=100)
    description: Description | None = None
    external_id: ExternalId | None = Field(default=None, description="Unique per tenant")
    metadata: Metadata = Field(default_factory=dict)


class BulkTransactionCreate(_Strict):
    transactions: list[TransactionCreate] = Field(min_length=1, max_length=1000)
    atomic: StrictBool = Field(default=True, description="All or nothing (default), or post what can be posted")


class ReversalCreate(_Strict):
    description: Description | None = None
    external_id: ExternalId | None = None
    metadata: Metadata = Field(default_factory=dict)


class TransactionEntryPublic(BaseModel):
    index: int
    account_id: uuid.UUID
    direction: Literal["debit", "credit"]
    amount: int
    currency: str
    kind: Literal["posted", "pending", "released"]
    account_version: int


class TransactionPublic(BaseModel):
    id: uuid.UUID
    entries: list[TransactionEntryPublic]
    posted_at: datetime
    # Every domain.TransactionKind: a kind missing here made listing a tenant's transactions a 500
    # once a refund was posted (found by tests/hostile; test_schemas checks they stay in step).
    kind: Literal["standard", "reversal", "hold_placed", "hold_posted", "hold_voided", "payment_refund"]
    description: str | None
    external_id: str | None
    metadata: dict[str, str]
    reverses_id: uuid.UUID | None
    hold_id: uuid.UUID | None
    payment_id: str | None
    hash: str = Field(description="sha256 chaining this transaction to its accounts' previous ones (hex)")


class TransactionList(BaseModel):
    data: list[TransactionPublic]
    next_cursor: str | None


class BulkItemResult(BaseModel):
    """Lean on purpose: a bulk answer is also stored as the Idempotency-Key's response;
    GET /v1/ledger/transactions/{id} has the details."""

    index: int
    status: Literal["posted", "refused"]
    transaction_id: uuid.UUID | None = None
    posted_at: datetime | None = None
    problem: dict[str, Any] | None = Field(default=None, description="Why it was refused (problem details)")


class BulkResult(BaseModel):
    data: list[BulkItemResult]
    posted: int
    refused: int


# ── holds ───────────────────────────────────────────────────────────────────────────


class HoldCreate(_Strict):
    debit_account_id: uuid.UUID = Field(description="Whose money is reserved (pending debit)")
    credit_account_id: uuid.UUID = Field(description="Where it goes if posted (pending credit)")
    amount: AmountMinor
    currency: CurrencyCode | None = None
    expires_at: Rfc3339 | None = Field(default=None, description="After this instant the hold voids itself")
    description: Description | None = None


class HoldPost(_Strict):
    amount: AmountMinor | None = Field(default=None, description="Post part of the hold; all of it by default")


class HoldVoid(_Strict):
    reason: Reason | None = None


class HoldPublic(BaseModel):
    id: uuid.UUID
    status: Literal["pending", "posted", "voided", "expired"]
    debit_account_id: uuid.UUID
    credit_account_id: uuid.UUID
    amount: int
    amount_posted: int
    currency: str
    payment_id: str | None
    description: str | None
    expires_at: datetime | None
    placed_transaction_id: uuid.UUID
    resolved_transaction_id: uuid.UUID | None
    void_reason: str | None
    created_at: datetime
    resolved_at: datetime | None


class HoldList(BaseModel):
    data: list[HoldPublic]
    next_cursor: str | None


# ── events this service publishes (the catalogue) ───────────────────────────────────


class AccountOpenedV1(BaseModel):
    account_id: str
    currency: str
    normal_balance: Literal["debit", "credit"]
    allow_negative: bool
    system_code: str | None


class EventEntry(BaseModel):
    account_id: str
    direction: Literal["debit", "credit"]
    amount: int
    currency: str


class TransactionPostedV1(BaseModel):
    transaction_id: str
    external_id: str | None
    payment_id: str | None = Field(default=None, description="Present when the transaction is a payment's")
    entries: list[EventEntry] = Field(description="The posted entries (pending layers are in hold events)")
    posted_at: str
    kind: str
    reverses_id: str | None
    hold_id: str | None
    refund_id: str | None = Field(default=None, description="Present for a payment refund's transaction")
    hash: str


class HoldPlacedV1(BaseModel):
    hold_id: str
    payment_id: str | None = Field(default=None, description="Present for a payment's hold")
    account_id: str = Field(description="The debited account (whose funds are reserved)")
    counter_account_id: str = Field(description="The credited account")
    amount: int
    currency: str
    expires_at: str | None
    transaction_id: str
    placed_at: str


class HoldRejectedV1(BaseModel):
    payment_id: str
    account_id: str
    amount: int
    currency: str
    reason: Literal["insufficient_funds", "account_not_found", "currency_mismatch"]


class HoldPostedV1(BaseModel):
    hold_id: str
    payment_id: str | None = Field(default=None, description="Present for a payment's hold")
    amount: int = Field(description="The amount posted")
    currency: str
    transaction_id: str
    posted_at: str
    hold_amount: int


class HoldVoidedV1(BaseModel):
    hold_id: str
    payment_id: str | None = Field(default=None, description="Present for a payment's hold")
    amount: int
    currency: str
    reason: str | None
    transaction_id: str
    voided_at: str


class HoldSkippedV1(BaseModel):
    payment_id: str
    reason: Literal["payment_settled_without_hold", "payment_failed_before_hold",
                    "payment_cancelled_before_hold"]
    amount: int | None
    currency: str | None


EVENT_SCHEMAS: dict[str, type[BaseModel]] = {
    "ledger.account.opened.v1": AccountOpenedV1,
    "ledger.transaction.posted.v1": TransactionPostedV1,
    "ledger.hold.placed.v1": HoldPlacedV1,
    "ledger.hold.rejected.v1": HoldRejectedV1,
    "ledger.hold.posted.v1": HoldPostedV1,
    "ledger.hold.voided.v1": HoldVoidedV1,
    "ledger.hold.skipped.v1": HoldSkippedV1,
}


# ── payment events this service consumes (unknown fields are ignored) ──────────────


class _Inbound(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PaymentApproved(_Inbound):
    payment_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    amount: AmountMinor
    currency: Annotated[str, StringConstraints(min_length=1, max_length=16)]
    debit_account_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]


class PaymentSettled(_Inbound):
    payment_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    amount: AmountMinor
    currency: Annotated[str, StringConstraints(min_length=1, max_length=16)]


class PaymentRefunded(_Inbound):
    payment_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    refund_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    amount: AmountMinor
    currency: Annotated[str, StringConstraints(min_length=1, max_length=16)]


class PaymentClosed(_Inbound):
    """payment.failed.v1 and payment.cancelled.v1."""

    payment_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    amount: AmountMinor | None = None
    currency: str | None = None
    failure_reason: str | None = None
    reason: str | None = None
