"""The payment order, its refunds and its processor attempts: states, the legal moves
between them, and the event every move records.

    pending_approval ──approve──▶ approved ──submit──▶ submitted ──settle──▶ settled ──refund──▶ partially_refunded
          │                          │  │                  │                    │                   │
          ├──reject──▶ rejected      │  └──fail──▶ failed ◀┘                    └──refund──▶ refunded ◀┘
          └──cancel──▶ cancelled ◀───┘ (only while nothing was handed to the processor)

A payment is event-sourced in miniature: every transition builds its event and applies it
through `_apply`, the one function that changes state, and `Payment.replay` folds stored
events through the same function. The projection row and a rebuild from the event log
therefore cannot disagree unless someone edits one of them behind the domain's back
(which `verify.py` looks for).

Processor updates (webhooks, janitor polls) arrive 0..n times and in any order; they are
ranked (processing < settled | failed) and a terminal state never regresses, so a late or
repeated update changes nothing.

This module does no I/O and reads no clock except to stamp the events it records. It must
never hold a payee's plaintext beyond `Payment.create` (events carry masked values only).
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from enum import StrEnum
from typing import Any

from shared.errors import Conflict, ValidationFailed
from shared.events import Aggregate, DomainEvent
from shared.redaction import is_valid_iban, mask_iban, mask_name


# ── statuses ───────────────────────────────────────────────────────────────────────────


class PaymentStatus(StrEnum):
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    SUBMITTED = "submitted"
    SETTLED = "settled"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"


S = PaymentStatus
PAYMENT_TRANSITIONS: Mapping[PaymentStatus, frozenset[PaymentStatus]] = {
    S.PENDING_APPROVAL: frozenset({S.APPROVED, S.REJECTED, S.CANCELLED}),
    # approved → failed: the ledger refused the hold, or the processor refused the payout.
    S.APPROVED: frozenset({S.SUBMITTED, S.FAILED, S.CANCELLED}),
    S.SUBMITTED: frozenset({S.SETTLED, S.FAILED}),
    S.SETTLED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED}),
    S.PARTIALLY_REFUNDED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED}),
    S.FAILED: frozenset(),
    S.REJECTED: frozenset(),
    S.CANCELLED: frozenset(),
    S.REFUNDED: frozenset(),
}
# Money reached the payee: the statuses a refund can start from.
SETTLED_STATUSES = frozenset({S.SETTLED, S.PARTIALLY_REFUNDED, S.REFUNDED})
# Statuses that need a granted approval (invariant 4).
APPROVED_STATUSES = frozenset({S.APPROVED, S.SUBMITTED, *SETTLED_STATUSES})


class RefundStatus(StrEnum):
    PENDING = "pending"
    SUBMITTED = "submitted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


R = RefundStatus
REFUND_TRANSITIONS: Mapping[RefundStatus, frozenset[RefundStatus]] = {
    R.PENDING: frozenset({R.SUBMITTED, R.FAILED}),
    R.SUBMITTED: frozenset({R.SUCCEEDED, R.FAILED}),
    R.SUCCEEDED: frozenset(),
    R.FAILED: frozenset(),
}
OPEN_REFUND_STATUSES = frozenset({R.PENDING, R.SUBMITTED})


class AttemptStatus(StrEnum):
    """One request to the processor (a payout, or a refund), retried under one id."""

    PENDING = "pending"  # due to be sent (again) at next_attempt_at
    SENDING = "sending"  # claimed by a submitter; the request may be on the wire
    SUBMITTED = "submitted"  # the processor acknowledged it; waiting for its final word
    UNKNOWN = "unknown"  # retries exhausted without an answer: the janitor asks the processor
    COMPLETED = "completed"  # the processor's final word is applied
    REJECTED = "rejected"  # the processor refused the request: nothing was moved
    CANCELLED = "cancelled"  # the payment was cancelled before anything was sent


A = AttemptStatus
ATTEMPT_TRANSITIONS: Mapping[AttemptStatus, frozenset[AttemptStatus]] = {
    A.PENDING: frozenset({A.SENDING, A.CANCELLED, A.SUBMITTED, A.COMPLETED}),
    A.SENDING: frozenset({A.PENDING, A.SUBMITTED, A.UNKNOWN, A.REJECTED, A.COMPLETED, A.SENDING}),
    A.UNKNOWN: frozenset({A.PENDING, A.SUBMITTED, A.COMPLETED, A.SENDING}),
    A.SUBMITTED: frozenset({A.COMPLETED}),
    A.COMPLETED: frozenset(),
    A.REJECTED: frozenset(),
    A.CANCELLED: frozenset(),
}


class ProcessorState(StrEnum):
    """A processor's word about a payout or refund, in Clearhouse's vocabulary."""

    PROCESSING = "processing"
    SUCCEEDED = "succeeded"  # payout settled / refund credited back
    FAILED = "failed"


class UpdateOutcome(StrEnum):
    APPLIED = "applied"  # moved the payment or refund forward
    DUPLICATE = "duplicate"  # a fact already known (the same news by another event id)
    STALE = "stale"  # older than what is known (a late `processing` after `settled`)
    CONFLICT = "conflict"  # contradicts a final fact (failed after settled): kept for people
    UNMATCHED = "unmatched"  # about nothing this service sent


class FailureReason(StrEnum):
    """Stable values of `failure_reason`."""

    INSUFFICIENT_FUNDS = "insufficient_funds"  # the ledger refused the hold
    ACCOUNT_NOT_FOUND = "account_not_found"
    CURRENCY_MISMATCH = "currency_mismatch"
    HOLD_REFUSED = "hold_refused"  # a ledger reason this version does not know
    HOLD_EXPIRED = "hold_expired"  # the ledger let the hold expire before submission
    HOLD_VOIDED = "hold_voided"  # the ledger voided the hold before submission
    PROCESSOR_REJECTED = "processor_rejected"  # refused at submission
    PROCESSOR_INSUFFICIENT_FUNDS = "processor_insufficient_funds"
    PAYEE_ACCOUNT_CLOSED = "payee_account_closed"
    PAYEE_ACCOUNT_INVALID = "payee_account_invalid"
    PROCESSOR_DECLINED = "processor_declined"  # any other processor failure code
    APPROVAL_REJECTED = "approval_rejected"
    APPROVAL_EXPIRED = "approval_expired"


LEDGER_REFUSALS = {
    "insufficient_funds": FailureReason.INSUFFICIENT_FUNDS,
    "account_not_found": FailureReason.ACCOUNT_NOT_FOUND,
    "currency_mismatch": FailureReason.CURRENCY_MISMATCH,
}


# ── errors ─────────────────────────────────────────────────────────────────────────────


class IllegalTransition(Conflict):
    code = "illegal_transition"
    title = "Illegal state transition"


class PaymentNotCancellable(IllegalTransition):
    code = "payment_not_cancellable"
    title = "Payment cannot be cancelled"


class PaymentNotRefundable(IllegalTransition):
    code = "payment_not_refundable"
    title = "Payment cannot be refunded"


class RefundExceedsRefundable(ValidationFailed):
    code = "refund_exceeds_refundable_amount"
    title = "Refund exceeds the refundable amount"


# ── payee data ─────────────────────────────────────────────────────────────────────────

# ISO 13616 registry: IBAN length per country. An IBAN of a country not listed, or of the
# wrong length, is refused even when its check digits happen to work out.
IBAN_LENGTHS: Mapping[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def normalize_iban(value: str) -> str:
    """`de89 3704 0044 0532 0130 00` -> `DE89370400440532013000`, or ValueError. The
    message never repeats the input (it may be a real account number)."""
    compact = "".join(value.split()).upper()
    if not compact.isascii() or not compact.isalnum():
        raise ValueError("an IBAN has only letters and digits (spaces between groups are allowed)")
    expected = IBAN_LENGTHS.get(compact[:2])
    if expected is None:
        raise ValueError("the IBAN's country code is not in the IBAN registry")
    if len(compact) != expected:
        raise ValueError(f"an IBAN of {compact[:2]} has {expected} characters")
    if not is_valid_iban(compact):
        raise ValueError("the IBAN's check digits are wrong")
    return compact


def check_text(value: str) -> str:
    """Refuse characters that have no business in a name or reference and that the
    database cannot store: control characters (NUL included) and lone surrogates."""
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError("control characters and unpaired surrogates are not allowed")
    if value != value.strip():
        raise ValueError("leading or trailing whitespace is not allowed")
    return value


# ── recorded events, as stored ───────────────────────────────────────────────────────


@dataclass(frozen=True)
class RecordedEvent:
    """An event of the log as `replay` needs it."""

    type: str
    payload: Mapping[str, Any]
    occurred_at: datetime


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ── the payment order ────────────────────────────────────────────────────────────────


class _EventSourced(Aggregate):
    """Payments and refunds change state only by recording an event and applying it, so
    the row and a rebuild from the log cannot disagree."""

    AGGREGATE: str
    ID_KEY: str  # the payload field naming the aggregate

    def _record(self, type_: str, payload: dict[str, Any], *, actor: str | None = None,
                reason: str | None = None) -> None:
        payload = {self.ID_KEY: str(self.id), **payload}
        event = DomainEvent(type_, self.AGGREGATE, str(self.id), payload, tenant_id=self.tenant_id, actor=actor,
                            reason=reason)
        self._apply(type_, payload, event.occurred_at)
        # The status after the event rides along, so the status history reads off the log.
        payload["status"] = str(self.status)
        self.record(event)


class Payment(_EventSourced):
    AGGREGATE = "payment"
    ID_KEY = "payment_id"

    def __init__(self, *, id: uuid.UUID, tenant_id: str) -> None:
        super().__init__()
        self.id = id
        self.tenant_id = tenant_id
        self.status: PaymentStatus = S.PENDING_APPROVAL
        self.amount = 0
        self.currency = ""
        self.debit_account_id = ""
        self.reference = ""
        self.metadata: dict[str, str] = {}
        self.payee_name_masked = ""
        self.payee_iban_masked = ""
        self.created_by = ""
        self.failure_reason: str | None = None
        self.cancellation_reason: str | None = None
        self.approval_id: str | None = None
        self.hold_id: str | None = None
        self.processor: str | None = None
        self.processor_payment_id: str | None = None
        self.value_date: date | None = None
        self.refunded_amount = 0
        self.version = 0
        self.created_at: datetime | None = None
        self.updated_at: datetime | None = None

    # ── creation and replay ──
    @classmethod
    def create(
        cls,
        *,
        id: uuid.UUID,
        tenant_id: str,
        amount: int,
        currency: str,
        debit_account_id: str,
        reference: str,
        metadata: Mapping[str, str],
        payee_name: str,
        payee_iban: str,
        created_by: str,
    ) -> Payment:
        payment = cls(id=id, tenant_id=tenant_id)
        payment._record("payment.created.v1", {
            "amount": amount,
            "currency": currency,
            "debit_account_id": debit_account_id,
            "reference": reference,
            "payee": {"name": mask_name(payee_name), "iban": mask_iban(payee_iban)},
            "created_by": created_by,
            "metadata": dict(metadata),
        }, reason="payment order received")
        return payment

    @classmethod
    def replay(cls, *, id: uuid.UUID, tenant_id: str, events: Iterable[RecordedEvent]) -> Payment:
        payment = cls(id=id, tenant_id=tenant_id)
        for event in events:
            payment._apply(event.type, event.payload, event.occurred_at)
        return payment

    # ── transitions ──
    def approve(self, *, approval_id: str, actor: str | None = None, reason: str | None = None) -> None:
        self._require(S.APPROVED)
        self._record("payment.approved.v1", {
            "amount": self.amount, "currency": self.currency, "debit_account_id": self.debit_account_id,
            "approval_id": approval_id,
        }, actor=actor, reason=reason)

    def reject(self, *, approval_id: str, expired: bool, actor: str | None = None) -> None:
        self._require(S.REJECTED)
        why = "expired" if expired else "rejected"
        self._record("payment.rejected.v1", {"approval_id": approval_id, "reason": why},
                     actor=actor, reason=f"approval {why}")

    def reserve_funds(self, *, hold_id: str) -> None:
        """The ledger placed the hold: the payment may now be handed to the processor."""
        if self.status is not S.APPROVED or self.hold_id is not None:
            raise IllegalTransition(f"A hold cannot be recorded for a payment that is {self.status}.")
        self._record("payment.funds_reserved.v1", {
            "hold_id": hold_id, "amount": self.amount, "currency": self.currency,
            "debit_account_id": self.debit_account_id,
        }, reason="ledger hold placed")

    def submit(self, *, processor: str, processor_payment_id: str, actor: str | None = None) -> None:
        self._require(S.SUBMITTED)
        if self.hold_id is None:
            # Money never leaves before it is reserved.
            raise IllegalTransition("A payment is submitted only once its funds are reserved.")
        self._record("payment.submitted.v1", {
            "amount": self.amount, "currency": self.currency, "processor": processor,
            "processor_payment_id": processor_payment_id,
        }, actor=actor, reason="accepted by the processor")

    def settle(self, *, value_date: date, actor: str | None = None) -> None:
        self._require(S.SETTLED)
        self._record("payment.settled.v1", {
            "amount": self.amount, "currency": self.currency, "debit_account_id": self.debit_account_id,
            "processor_payment_id": self.processor_payment_id, "value_date": value_date.isoformat(),
            "hold_id": self.hold_id,
        }, actor=actor, reason="settled by the processor")

    def fail(self, *, failure_reason: str, actor: str | None = None, reason: str | None = None) -> None:
        self._require(S.FAILED)
        self._record("payment.failed.v1", {
            "amount": self.amount, "currency": self.currency, "debit_account_id": self.debit_account_id,
            "failure_reason": failure_reason, "hold_id": self.hold_id,
        }, actor=actor, reason=reason or failure_reason)

    def cancel(self, *, reason: str | None, submission_started: bool, actor: str | None = None) -> None:
        """Cancel before anything reached the processor. `submission_started` says whether
        a request for this payment was ever sent: once it was, the processor may execute
        it whatever we decide, so voiding the hold would let unreserved money leave."""
        if S.CANCELLED not in PAYMENT_TRANSITIONS[self.status]:
            raise PaymentNotCancellable(f"A payment that is {self.status} cannot be cancelled.",
                                        payment_status=str(self.status))
        if submission_started:
            raise PaymentNotCancellable("The payment is being submitted to the processor and cannot be cancelled.",
                                        payment_status=str(self.status))
        self._record("payment.cancelled.v1", {
            "amount": self.amount, "currency": self.currency, "debit_account_id": self.debit_account_id,
            "reason": reason, "hold_id": self.hold_id,
        }, actor=actor, reason=reason or "cancelled")

    def refundable_amount(self, *, open_refunds: int) -> int:
        return self.amount - self.refunded_amount - open_refunds

    def check_refund(self, *, amount: int, open_refunds: int) -> None:
        """A refund may start: the payment settled and `amount` fits in what is left after
        earlier refunds, counting those still open (so two at once cannot exceed it)."""
        if self.status not in (S.SETTLED, S.PARTIALLY_REFUNDED):
            raise PaymentNotRefundable(f"A payment that is {self.status} cannot be refunded.",
                                       payment_status=str(self.status))
        refundable = self.refundable_amount(open_refunds=open_refunds)
        if refundable <= 0:
            raise RefundExceedsRefundable("Nothing is left to refund on this payment (refunds in flight count).",
                                          refundable_amount=0)
        if not 0 < amount <= refundable:
            raise RefundExceedsRefundable(
                f"The refund of {amount} exceeds the {refundable} still refundable on this payment.",
                refundable_amount=refundable)

    def record_refund(self, *, refund_id: uuid.UUID, amount: int, actor: str | None = None) -> None:
        """The processor confirmed a refund: the money came back."""
        target = S.REFUNDED if self.refunded_amount + amount == self.amount else S.PARTIALLY_REFUNDED
        self._require(target)
        if amount <= 0 or self.refunded_amount + amount > self.amount:
            raise IllegalTransition("A refund cannot exceed the settled amount.")
        self._record("payment.refunded.v1", {
            "refund_id": str(refund_id), "amount": amount, "currency": self.currency,
            "debit_account_id": self.debit_account_id, "refunded_total": self.refunded_amount + amount,
        }, actor=actor, reason="refund confirmed by the processor")

    # ── the processor's word ──
    def apply_processor_state(
        self,
        state: ProcessorState,
        *,
        processor: str,
        processor_payment_id: str,
        value_date: date | None,
        failure_reason: str | None,
        actor: str | None = None,
    ) -> UpdateOutcome:
        """Apply what the processor says about this payment's payout, whatever order and
        however often it says it. Ranks: processing < settled | failed; final never moves."""
        if self.status is S.APPROVED and self.hold_id is not None:
            # The news may overtake our own record of the submission: it proves acceptance.
            self.submit(processor=processor, processor_payment_id=processor_payment_id, actor=actor)
            if state is ProcessorState.PROCESSING:
                return UpdateOutcome.APPLIED
        if self.status is S.SUBMITTED:
            if state is ProcessorState.PROCESSING:
                return UpdateOutcome.DUPLICATE
            if state is ProcessorState.SUCCEEDED:
                self.settle(value_date=value_date or _now().date(), actor=actor)
            else:
                self.fail(failure_reason=failure_reason or FailureReason.PROCESSOR_DECLINED, actor=actor,
                          reason="failed at the processor")
            return UpdateOutcome.APPLIED
        if self.status in SETTLED_STATUSES:
            return {ProcessorState.PROCESSING: UpdateOutcome.STALE, ProcessorState.SUCCEEDED: UpdateOutcome.DUPLICATE,
                    ProcessorState.FAILED: UpdateOutcome.CONFLICT}[state]
        if self.status is S.FAILED and self.processor_payment_id is not None:
            return {ProcessorState.PROCESSING: UpdateOutcome.STALE, ProcessorState.FAILED: UpdateOutcome.DUPLICATE,
                    ProcessorState.SUCCEEDED: UpdateOutcome.CONFLICT}[state]
        # Never submitted (pending approval, no hold, cancelled, rejected, refused): a
        # processor that claims otherwise contradicts us.
        return UpdateOutcome.CONFLICT

    # ── plumbing ──
    @property
    def submission_allowed(self) -> bool:
        return self.status is S.APPROVED and self.hold_id is not None

    def _require(self, target: PaymentStatus) -> None:
        if target not in PAYMENT_TRANSITIONS[self.status]:
            raise IllegalTransition(f"A payment that is {self.status} cannot become {target}.",
                                    payment_status=str(self.status))

    def _apply(self, type_: str, payload: Mapping[str, Any], occurred_at: datetime) -> None:
        """The one place state changes: used when recording and when replaying."""
        kind = type_.rsplit(".", 1)[0]
        if kind == "payment.created":
            self.status = S.PENDING_APPROVAL
            self.amount = payload["amount"]
            self.currency = payload["currency"]
            self.debit_account_id = payload["debit_account_id"]
            self.reference = payload["reference"]
            self.metadata = dict(payload.get("metadata") or {})
            self.payee_name_masked = payload["payee"]["name"]
            self.payee_iban_masked = payload["payee"]["iban"]
            self.created_by = payload["created_by"]
            self.created_at = occurred_at
        elif kind == "payment.approved":
            self.status = S.APPROVED
            self.approval_id = payload["approval_id"]
        elif kind == "payment.rejected":
            self.status = S.REJECTED
            self.approval_id = payload.get("approval_id")
            self.failure_reason = (FailureReason.APPROVAL_EXPIRED if payload.get("reason") == "expired"
                                   else FailureReason.APPROVAL_REJECTED)
        elif kind == "payment.funds_reserved":
            self.hold_id = payload["hold_id"]
        elif kind == "payment.submitted":
            self.status = S.SUBMITTED
            self.processor = payload["processor"]
            self.processor_payment_id = payload["processor_payment_id"]
        elif kind == "payment.settled":
            self.status = S.SETTLED
            self.value_date = date.fromisoformat(payload["value_date"])
        elif kind == "payment.failed":
            self.status = S.FAILED
            self.failure_reason = payload["failure_reason"]
        elif kind == "payment.cancelled":
            self.status = S.CANCELLED
            self.cancellation_reason = payload.get("reason")
        elif kind == "payment.refunded":
            self.refunded_amount += payload["amount"]
            self.status = S.REFUNDED if self.refunded_amount == self.amount else S.PARTIALLY_REFUNDED
        else:
            return  # an event type from a later version: nothing this code knows to change
        self.version += 1
        self.updated_at = occurred_at


# ── refunds ──────────────────────────────────────────────────────────────────────────


class Refund(_EventSourced):
    AGGREGATE = "refund"
    ID_KEY = "refund_id"

    def __init__(self, *, id: uuid.UUID, tenant_id: str) -> None:
        super().__init__()
        self.id = id
        self.tenant_id = tenant_id
        self.payment_id: uuid.UUID | None = None
        self.amount = 0
        self.currency = ""
        self.status: RefundStatus = R.PENDING
        self.reason: str | None = None
        self.failure_reason: str | None = None
        self.processor_refund_id: str | None = None
        self.created_by = ""
        self.version = 0
        self.created_at: datetime | None = None
        self.updated_at: datetime | None = None

    @classmethod
    def create(cls, *, id: uuid.UUID, payment: Payment, amount: int, reason: str | None, created_by: str,
               open_refunds: int) -> Refund:
        payment.check_refund(amount=amount, open_refunds=open_refunds)
        refund = cls(id=id, tenant_id=payment.tenant_id)
        refund._record("refund.created.v1", {
            "payment_id": str(payment.id), "amount": amount, "currency": payment.currency, "reason": reason,
            "created_by": created_by,
        }, reason=reason or "refund requested")
        return refund

    @classmethod
    def replay(cls, *, id: uuid.UUID, tenant_id: str, events: Iterable[RecordedEvent]) -> Refund:
        refund = cls(id=id, tenant_id=tenant_id)
        for event in events:
            refund._apply(event.type, event.payload, event.occurred_at)
        return refund

    def apply_processor_state(
        self, state: ProcessorState, *, processor_refund_id: str, failure_reason: str | None, payment: Payment,
        actor: str | None = None,
    ) -> UpdateOutcome:
        if self.status is R.PENDING:
            self._move(R.SUBMITTED, "refund.submitted.v1", {"processor_refund_id": processor_refund_id}, actor=actor,
                       reason="accepted by the processor")
            if state is ProcessorState.PROCESSING:
                return UpdateOutcome.APPLIED
        if self.status is R.SUBMITTED:
            if state is ProcessorState.PROCESSING:
                return UpdateOutcome.DUPLICATE
            if state is ProcessorState.SUCCEEDED:
                self._move(R.SUCCEEDED, "refund.succeeded.v1", {}, actor=actor, reason="confirmed by the processor")
                payment.record_refund(refund_id=self.id, amount=self.amount, actor=actor)
            else:
                self.fail(failure_reason=failure_reason or FailureReason.PROCESSOR_DECLINED, actor=actor)
            return UpdateOutcome.APPLIED
        if self.status is R.SUCCEEDED:
            return {ProcessorState.PROCESSING: UpdateOutcome.STALE, ProcessorState.SUCCEEDED: UpdateOutcome.DUPLICATE,
                    ProcessorState.FAILED: UpdateOutcome.CONFLICT}[state]
        return {ProcessorState.PROCESSING: UpdateOutcome.STALE, ProcessorState.FAILED: UpdateOutcome.DUPLICATE,
                ProcessorState.SUCCEEDED: UpdateOutcome.CONFLICT}[state]

    def fail(self, *, failure_reason: str, actor: str | None = None) -> None:
        self._move(R.FAILED, "refund.failed.v1", {"failure_reason": failure_reason}, actor=actor,
                   reason=failure_reason)

    def _move(self, target: RefundStatus, type_: str, extra: dict[str, Any], *, actor: str | None,
              reason: str) -> None:
        if target not in REFUND_TRANSITIONS[self.status]:
            raise IllegalTransition(f"A refund that is {self.status} cannot become {target}.",
                                    refund_status=str(self.status))
        self._record(type_, {"payment_id": str(self.payment_id), "amount": self.amount, "currency": self.currency,
                             **extra}, actor=actor, reason=reason)

    def _apply(self, type_: str, payload: Mapping[str, Any], occurred_at: datetime) -> None:
        kind = type_.rsplit(".", 1)[0]
        if kind == "refund.created":
            self.payment_id = uuid.UUID(payload["payment_id"])
            self.amount = payload["amount"]
            self.currency = payload["currency"]
            self.reason = payload.get("reason")
            self.created_by = payload["created_by"]
            self.status = R.PENDING
            self.created_at = occurred_at
        elif kind == "refund.submitted":
            self.status = R.SUBMITTED
            self.processor_refund_id = payload["processor_refund_id"]
        elif kind == "refund.succeeded":
            self.status = R.SUCCEEDED
        elif kind == "refund.failed":
            self.status = R.FAILED
            self.failure_reason = payload["failure_reason"]
        else:
            return
        self.version += 1
        self.updated_at = occurred_at


def attempt_transition_allowed(current: AttemptStatus, target: AttemptStatus) -> bool:
    return target in ATTEMPT_TRANSITIONS[current]
