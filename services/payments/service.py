"""Use cases of the payments service: what an API call, a consumed event, a processor
webhook or a job does, each inside the caller's unit of work.

    API          create_payment, cancel_payment, request_refund, reads
    consumers    record_approval_granted / _declined, record_hold_placed / _rejected
    webhooks     apply_processor_update (also fed by the janitor's polls)
    jobs         claim_submissions, record_submission_* , claim_checks

Every change to a payment happens with its row locked (`FOR UPDATE`), so two writers of
one payment (a cancel racing an approval, two copies of a webhook) give one outcome.
Consumed events and processor news are idempotent on their business keys as well as on
their ids: a duplicate fact finds the payment already moved and changes nothing.

Use cases never commit, never call a processor (that happens between two transactions,
in `jobs.py`) and never log payee plaintext.
"""

from __future__ import annotations

import base64
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from services.payments import repository as repo
from services.payments.connector import (
    DEFAULT_PROCESSOR, PayoutRequest, ProcessorObject, ProcessorRejected, ProcessorUpdate, RefundRequest,
)
from services.payments.crypto import Payee, PayeeCipher, PayeeDecryptionError
from services.payments.domain import (
    LEDGER_REFUSALS, AttemptStatus, FailureReason, Payment, PaymentStatus, ProcessorState, Refund, RefundStatus,
    UpdateOutcome,
)
from services.payments.schemas import ApprovalDecided, HoldPlaced, HoldRejected, HoldVoided, ListFilters, PaymentCreate
from shared import context
from shared.errors import BadRequest, NotFound, Unauthorized
from shared.uow import UnitOfWork, current_traceparent

log = logging.getLogger(__name__)


# ── errors ─────────────────────────────────────────────────────────────────────────


class PaymentNotFound(NotFound):
    code = "payment_not_found"
    title = "Payment not found"


class RefundNotFound(NotFound):
    code = "refund_not_found"
    title = "Refund not found"


class InvalidCursor(BadRequest):
    code = "invalid_cursor"
    title = "Invalid cursor"


class UnknownProcessor(NotFound):
    code = "unknown_processor"
    title = "Unknown processor"


class InvalidWebhookSignature(Unauthorized):
    code = "invalid_webhook_signature"
    title = "Invalid webhook signature"


class MalformedWebhook(BadRequest):
    code = "malformed_webhook"
    title = "Malformed webhook"


def parse_id(value: str, *, error: type[NotFound] = PaymentNotFound) -> uuid.UUID:
    """Ids in paths are UUIDs; anything else names nothing (404, not a validation error)."""
    try:
        if len(value) > 36:
            raise ValueError
        return uuid.UUID(value)
    except ValueError:
        raise error("No such object.") from None


# ── payments: API ───────────────────────────────────────────────────────────────────


async def create_payment(*, uow: UnitOfWork, cipher: PayeeCipher, tenant_id: str, created_by: str,
                         request: PaymentCreate) -> Payment:
    payment = Payment.create(
        id=uuid.uuid4(), tenant_id=tenant_id, amount=request.amount, currency=request.currency,
        debit_account_id=request.debit_account_id, reference=request.reference, metadata=request.metadata,
        payee_name=request.payee.name, payee_iban=request.payee.iban, created_by=created_by,
    )
    sealed = cipher.seal(payment_id=payment.id, payee=Payee(name=request.payee.name, iban=request.payee.iban))
    await repo.add_payment(uow.session, payment=payment, sealed=sealed)
    uow.track(payment)
    return payment


async def get_payment(*, session: AsyncSession, tenant_id: str, payment_id: str) -> Payment:
    payment = await repo.get_payment(session, tenant_id=tenant_id, payment_id=parse_id(payment_id))
    if payment is None:
        raise PaymentNotFound("No such payment.")
    return payment


async def list_payments(*, session: AsyncSession, tenant_id: str,
                        filters: ListFilters) -> tuple[list[Payment], str | None]:
    after = decode_cursor(filters.cursor) if filters.cursor else None
    found = await repo.list_payments(
        session, tenant_id=tenant_id, status=str(filters.status) if filters.status else None,
        created_gte=filters.created_gte, created_lt=filters.created_lt, after=after, limit=filters.limit + 1)
    page = found[:filters.limit]
    next_cursor = encode_cursor(page[-1]) if len(found) > filters.limit else None
    return page, next_cursor


async def cancel_payment(*, uow: UnitOfWork, tenant_id: str, payment_id: str, reason: str | None) -> Payment:
    payment = await repo.get_payment(uow.session, tenant_id=tenant_id, payment_id=parse_id(payment_id),
                                     for_update=True)
    if payment is None:
        raise PaymentNotFound("No such payment.")
    attempt = await repo.payout_attempt(uow.session, payment.id, for_update=True)
    # A request that was ever handed to the processor may execute whatever we decide now.
    started = attempt is not None and (attempt.tries > 0 or attempt.status is not AttemptStatus.PENDING)
    payment.cancel(reason=reason, submission_started=started)
    if attempt is not None:
        await repo.set_attempt(uow.session, attempt.id, status=AttemptStatus.CANCELLED)
    await repo.save_payment(uow.session, payment)
    uow.track(payment)
    return payment


async def payment_history(*, session: AsyncSession, tenant_id: str, payment_id: str) -> list:
    payment = await get_payment(session=session, tenant_id=tenant_id, payment_id=payment_id)
    return await repo.payment_history(session, tenant_id=tenant_id, payment_id=payment.id)


def encode_cursor(payment: Payment) -> str:
    raw = orjson.dumps([payment.created_at.isoformat(), str(payment.id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, payment_id = orjson.loads(raw)
        instant = datetime.fromisoformat(created_at)
        if instant.tzinfo is None:
            raise ValueError
        return instant, uuid.UUID(payment_id)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise InvalidCursor("The cursor is not one this API returned.") from None


# ── refunds ─────────────────────────────────────────────────────────────────────────


async def request_refund(*, uow: UnitOfWork, tenant_id: str, payment_id: str, amount: int | None,
                         reason: str | None, created_by: str) -> Refund:
    payment = await repo.get_payment(uow.session, tenant_id=tenant_id, payment_id=parse_id(payment_id),
                                     for_update=True)
    if payment is None:
        raise PaymentNotFound("No such payment.")
    # Under the payment's row lock: two refunds at once cannot both fit in the same rest.
    open_refunds = await repo.open_refunds_total(uow.session, payment.id)
    if amount is None:
        amount = payment.refundable_amount(open_refunds=open_refunds)  # nothing left → refused below
    refund = Refund.create(id=uuid.uuid4(), payment=payment, amount=amount, reason=reason, created_by=created_by,
                           open_refunds=open_refunds)
    await repo.add_refund(uow.session, refund)
    ctx = context.current()
    await repo.add_attempt(uow.session, attempt_id=uuid.uuid4(), tenant_id=tenant_id, kind="refund",
                           payment_id=payment.id, refund_id=refund.id, processor=payment.processor or DEFAULT_PROCESSOR,
                           correlation_id=ctx.correlation_id, traceparent=current_traceparent())
    uow.track(refund)
    return refund


async def get_refund(*, session: AsyncSession, tenant_id: str, payment_id: str, refund_id: str) -> Refund:
    refund = await repo.get_refund(session, tenant_id=tenant_id, payment_id=parse_id(payment_id),
                                   refund_id=parse_id(refund_id, error=RefundNotFound))
    if refund is None:
        raise RefundNotFound("No such refund.")
    return refund


async def list_refunds(*, session: AsyncSession, tenant_id: str, payment_id: str) -> list[Refund]:
    payment = await get_payment(session=session, tenant_id=tenant_id, payment_id=payment_id)
    return await repo.list_refunds(session, tenant_id=tenant_id, payment_id=payment.id)


# ── consumed events ─────────────────────────────────────────────────────────────────


async def _payment_for_event(uow: UnitOfWork, *, tenant_id: str | None, payment_id: uuid.UUID | None,
                             event: str) -> Payment | None:
    if tenant_id is None or payment_id is None:
        log.warning("%s without tenant or payment id: ignored", event)
        return None
    payment = await repo.get_payment(uow.session, tenant_id=tenant_id, payment_id=payment_id, for_update=True)
    if payment is None:
        log.warning("%s for an unknown payment: ignored", event, extra={"payment_id": str(payment_id)})
    return payment


def _subject_payment_id(decided: ApprovalDecided) -> uuid.UUID | None:
    if decided.subject_type not in (None, "payment"):
        return None
    if decided.payment_id is not None:
        return decided.payment_id
    try:
        return uuid.UUID(decided.subject_id) if decided.subject_id else None
    except ValueError:
        return None


async def record_approval_granted(*, uow: UnitOfWork, tenant_id: str | None, decided: ApprovalDecided,
                                  actor: str | None) -> None:
    if decided.subject_type not in (None, "payment"):
        return  # approvals decides other things too; not ours
    payment = await _payment_for_event(uow, tenant_id=tenant_id, payment_id=_subject_payment_id(decided),
                                       event="approval.granted")
    if payment is None:
        return
    if payment.status is not PaymentStatus.PENDING_APPROVAL:
        # Already approved (the same fact again), or cancelled first: the race is settled
        # by whoever took the row lock first, and a cancelled payment stays cancelled.
        log.info("approval.granted for a payment that is %s: nothing to do", payment.status,
                 extra={"payment_id": str(payment.id)})
        return
    payment.approve(approval_id=decided.approval_id, actor=actor or "service:approvals", reason="approval granted")
    await repo.save_payment(uow.session, payment)
    uow.track(payment)


async def record_approval_declined(*, uow: UnitOfWork, tenant_id: str | None, decided: ApprovalDecided,
                                   expired: bool, actor: str | None) -> None:
    if decided.subject_type not in (None, "payment"):
        return
    payment = await _payment_for_event(uow, tenant_id=tenant_id, payment_id=_subject_payment_id(decided),
                                       event="approval.rejected" if not expired else "approval.expired")
    if payment is None or payment.status is not PaymentStatus.PENDING_APPROVAL:
        return
    payment.reject(approval_id=decided.approval_id, expired=expired, actor=actor or "service:approvals")
    await repo.save_payment(uow.session, payment)
    uow.track(payment)


async def record_hold_placed(*, uow: UnitOfWork, tenant_id: str | None, hold: HoldPlaced) -> None:
    payment = await _payment_for_event(uow, tenant_id=tenant_id, payment_id=hold.payment_id,
                                       event="ledger.hold.placed")
    if payment is None:
        return
    if payment.hold_id == hold.hold_id:
        return  # the same hold again: already recorded
    if payment.status is not PaymentStatus.APPROVED or payment.hold_id is not None:
        # Cancelled meanwhile: the ledger voids the hold on payment.cancelled, and nothing
        # is submitted. A second, different hold would be the ledger's bug: never a
        # second submission.
        log.warning("ledger.hold.placed for a payment that is %s (hold recorded: %s): not submitting",
                    payment.status, "yes" if payment.hold_id else "no", extra={"payment_id": str(payment.id)})
        return
    payment.reserve_funds(hold_id=hold.hold_id)
    await repo.save_payment(uow.session, payment)
    ctx = context.current()
    # The submission itself happens outside this transaction (jobs.py): a processor call
    # inside it would hold the row lock for a network round trip and could not be undone.
    await repo.add_attempt(uow.session, attempt_id=uuid.uuid4(), tenant_id=payment.tenant_id, kind="payout",
                           payment_id=payment.id, refund_id=None, processor=DEFAULT_PROCESSOR,
                           correlation_id=ctx.correlation_id, traceparent=current_traceparent())
    uow.track(payment)


async def record_hold_rejected(*, uow: UnitOfWork, tenant_id: str | None, refusal: HoldRejected) -> None:
    payment = await _payment_for_event(uow, tenant_id=tenant_id, payment_id=refusal.payment_id,
                                       event="ledger.hold.rejected")
    if payment is None or payment.status is not PaymentStatus.APPROVED or payment.hold_id is not None:
        return
    reason = LEDGER_REFUSALS.get(refusal.reason, FailureReason.HOLD_REFUSED)
    payment.fail(failure_reason=str(reason), actor="service:ledger", reason=f"hold refused: {refusal.reason}")
    await repo.save_payment(uow.session, payment)
    uow.track(payment)


async def record_hold_voided(*, uow: UnitOfWork, tenant_id: str | None, voided: HoldVoided) -> None:
    """The reservation is gone. After our own payment.failed/cancelled that is expected;
    before submission (the ledger let the hold expire) the payment must not leave any
    more: it fails. If a request already went to the processor it cannot be recalled,
    and a person must look (logged at ERROR)."""
    payment = await _payment_for_event(uow, tenant_id=tenant_id, payment_id=voided.payment_id,
                                       event="ledger.hold.voided")
    if payment is None or payment.hold_id != voided.hold_id:
        return
    if payment.status is PaymentStatus.SUBMITTED:
        log.error("the ledger voided the hold of a payment the processor has (%s)", voided.reason,
                  extra={"payment_id": str(payment.id)})
        return
    if payment.status is not PaymentStatus.APPROVED:
        return  # settled, failed or cancelled: the void follows from our own event
    attempt = await repo.payout_attempt(uow.session, payment.id, for_update=True)
    if attempt is not None and (attempt.tries > 0 or attempt.status is not AttemptStatus.PENDING):
        log.error("the ledger voided the hold of a payment whose request may be at the processor (%s)",
                  voided.reason, extra={"payment_id": str(payment.id)})
        return
    reason = FailureReason.HOLD_EXPIRED if voided.reason == "expired" else FailureReason.HOLD_VOIDED
    payment.fail(failure_reason=str(reason), actor="service:ledger", reason=f"hold voided: {voided.reason}")
    if attempt is not None:
        await repo.set_attempt(uow.session, attempt.id, status=AttemptStatus.CANCELLED)
    await repo.save_payment(uow.session, payment)
    uow.track(payment)


# ── processor news: webhooks and polls ──────────────────────────────────────────────


async def apply_processor_update(*, uow: UnitOfWork, update: ProcessorUpdate, actor: str) -> UpdateOutcome:
    """Apply one piece of processor news exactly once (by its event id) and in rank order
    (a late `processing` after `settled` changes nothing).

    Hot path (webhooks arrive in bursts, many of them re-deliveries): a committed
    duplicate costs one query; a new event locks the payment, then its attempt (checking
    the event id again under the lock), and writes everything it changed in one
    statement."""
    session = uow.session
    found = update.object
    if await repo.processor_event_seen(session, processor=update.processor, event_id=update.event_id):
        return UpdateOutcome.DUPLICATE
    # Lock order: the payment, then the attempt (and refund) of that payment.
    attempt_id = found.request_id
    if attempt_id is None:
        known = await repo.attempt_by_processor_object(session, processor=update.processor, kind=found.kind,
                                                       processor_object_id=found.processor_object_id)
        attempt_id = known.id if known else None
    payment = await repo.lock_payment_of_attempt(session, attempt_id) if attempt_id else None
    attempt, seen = (await repo.lock_attempt_and_check_seen(
        session, attempt_id=attempt_id, processor=update.processor, event_id=update.event_id)
        if payment is not None else (None, False))
    if seen:
        return UpdateOutcome.DUPLICATE  # a concurrent copy committed while we waited
    if attempt is None or attempt.kind != found.kind or attempt.processor != update.processor:
        inserted = await repo.remember_processor_event(
            session, processor=update.processor, event_id=update.event_id, event_type=update.event_type,
            attempt_id=None, outcome=str(UpdateOutcome.UNMATCHED))
        if inserted:
            log.warning("processor event %s about nothing we sent", update.event_id,
                        extra={"processor": update.processor})
        return UpdateOutcome.UNMATCHED if inserted else UpdateOutcome.DUPLICATE

    bind = context.bind(tenant_id=payment.tenant_id, actor=actor)
    try:
        if attempt.kind == "payout":
            outcome = payment.apply_processor_state(
                found.state, processor=update.processor, processor_payment_id=found.processor_object_id,
                value_date=found.value_date, failure_reason=found.failure_reason, actor=actor)
        else:
            refund = await repo.get_refund(session, tenant_id=payment.tenant_id, payment_id=payment.id,
                                           refund_id=attempt.refund_id, for_update=True)
            outcome = refund.apply_processor_state(found.state, processor_refund_id=found.processor_object_id,
                                                   failure_reason=found.failure_reason, payment=payment, actor=actor)
            if refund.events:
                await repo.save_refund(session, refund)
                uow.track(refund)
    finally:
        context.reset(bind)
    if payment.events:
        uow.track(payment)
    await repo.record_processor_news(
        session, payment=payment if payment.events else None, attempt_id=attempt.id,
        attempt_status=_next_attempt_status(attempt, found, outcome), processor_object_id=found.processor_object_id,
        processor=update.processor, event_id=update.event_id, event_type=update.event_type, outcome=str(outcome))
    if outcome is UpdateOutcome.CONFLICT:
        log.error("processor event %s contradicts what is known (%s is %s)", update.event_id, attempt.kind,
                  payment.status, extra={"payment_id": str(payment.id), "processor": update.processor})
    return outcome


def _next_attempt_status(attempt: repo.Attempt, found: ProcessorObject, outcome: UpdateOutcome) -> str | None:
    """The attempt's next status after this news, or None if it stays as it is."""
    if found.state is ProcessorState.PROCESSING:
        if attempt.status in (AttemptStatus.PENDING, AttemptStatus.SENDING, AttemptStatus.UNKNOWN):
            return str(AttemptStatus.SUBMITTED)
        return None
    if outcome in (UpdateOutcome.APPLIED, UpdateOutcome.DUPLICATE) and attempt.status is not AttemptStatus.COMPLETED:
        return str(AttemptStatus.COMPLETED)
    return None


# ── submission (jobs.py calls these around the processor call) ──────────────────────


@dataclass(frozen=True)
class Submission:
    """A claimed attempt and what to send for it. `tries` fences the claim: a result is
    recorded only if nobody claimed the attempt again meanwhile."""

    attempt: repo.Attempt
    tries: int
    payout: PayoutRequest | None = None
    refund: RefundRequest | None = None


async def claim_submissions(*, uow: UnitOfWork, cipher: PayeeCipher, limit: int, lease_s: float) -> list[Submission]:
    session = uow.session
    claimed = []
    for attempt, payment in await repo.claim_due_attempts(session, limit=limit):
        if attempt.kind == "payout" and payment.status is PaymentStatus.CANCELLED:
            await repo.set_attempt(session, attempt.id, status=AttemptStatus.CANCELLED)
            continue
        tries = attempt.tries + 1
        if attempt.kind == "payout":
            try:
                payee = cipher.open(payment_id=payment.id, sealed=await repo.get_sealed_payee(session, payment.id))
            except PayeeDecryptionError as exc:
                # A keyring misconfiguration: park this one loudly, keep sending the others.
                log.error("cannot decrypt the payee of a payment due for submission: %s", exc,
                          extra={"payment_id": str(payment.id)})
                await repo.set_attempt(session, attempt.id, last_error="payee data cannot be decrypted",
                                       next_in_s=lease_s)
                continue
            await repo.set_attempt(session, attempt.id, status=AttemptStatus.SENDING, tries=tries, lease_s=lease_s)
            request = PayoutRequest(request_id=attempt.id, payment_id=payment.id, amount=payment.amount,
                                    currency=payment.currency, payee_name=payee.name, payee_iban=payee.iban,
                                    reference=payment.reference)
            claimed.append(Submission(attempt=attempt, tries=tries, payout=request))
        else:
            await repo.set_attempt(session, attempt.id, status=AttemptStatus.SENDING, tries=tries, lease_s=lease_s)
            refund = await repo.get_refund(session, tenant_id=payment.tenant_id, payment_id=payment.id,
                                           refund_id=attempt.refund_id)
            request = RefundRequest(request_id=attempt.id, payment_id=payment.id, refund_id=refund.id,
                                    processor_payment_id=payment.processor_payment_id, amount=refund.amount,
                                    currency=refund.currency)
            claimed.append(Submission(attempt=attempt, tries=tries, refund=request))
    return claimed


async def _still_ours(session: AsyncSession, submission: Submission) -> repo.Attempt | None:
    attempt = await repo.get_attempt(session, submission.attempt.id, for_update=True)
    if attempt is None or attempt.status is not AttemptStatus.SENDING or attempt.tries != submission.tries:
        return None  # news overtook us (a webhook), or another submitter re-claimed it
    return attempt


async def record_submission_accepted(*, uow: UnitOfWork, submission: Submission,
                                     found: ProcessorObject) -> UpdateOutcome:
    update = ProcessorUpdate(processor=submission.attempt.processor,
                             event_id=f"submit:{submission.attempt.id}:{found.state}",
                             event_type=f"{found.kind}.accepted",
                             object=_with_request_id(found, submission.attempt.id))
    return await apply_processor_update(uow=uow, update=update, actor="job:submitter")


async def record_submission_rejected(*, uow: UnitOfWork, submission: Submission, rejection: ProcessorRejected) -> None:
    session = uow.session
    payment = await repo.lock_payment_by_id(session, submission.attempt.payment_id)
    if await _still_ours(session, submission) is None:
        return
    await repo.set_attempt(session, submission.attempt.id, status=AttemptStatus.REJECTED, lease_until=None,
                           last_error=f"rejected: {rejection.code}")
    bind = context.bind(tenant_id=payment.tenant_id, actor="job:submitter")
    try:
        if submission.attempt.kind == "payout":
            if payment.status is PaymentStatus.APPROVED:
                payment.fail(failure_reason=rejection.failure_reason, actor="job:submitter",
                             reason=f"processor refused the payout: {rejection.code}")
                await repo.save_payment(session, payment)
                uow.track(payment)
        else:
            refund = await repo.get_refund(session, tenant_id=payment.tenant_id, payment_id=payment.id,
                                           refund_id=submission.attempt.refund_id, for_update=True)
            if refund.status is RefundStatus.PENDING:
                refund.fail(failure_reason=rejection.failure_reason, actor="job:submitter")
                await repo.save_refund(session, refund)
                uow.track(refund)
    finally:
        context.reset(bind)


async def record_submission_unavailable(*, uow: UnitOfWork, submission: Submission, error: str, max_tries: int,
                                        retry_in_s: float, recheck_in_s: float) -> bool:
    """Back to the queue after `retry_in_s`, or, once tries are spent, in doubt (`unknown`)
    for the janitor. Returns True when the attempt went to the janitor."""
    attempt = await _still_ours(uow.session, submission)
    if attempt is None:
        return False
    exhausted = attempt.tries >= max_tries
    await repo.set_attempt(
        uow.session, attempt.id, status=AttemptStatus.UNKNOWN if exhausted else AttemptStatus.PENDING,
        lease_until=None, last_error=error[:500], next_in_s=recheck_in_s if exhausted else retry_in_s)
    return exhausted


async def release_submission(*, uow: UnitOfWork, submission: Submission) -> None:
    """Give a claimed attempt back unsent (the circuit opened before its turn): it does
    not count as a try."""
    attempt = await _still_ours(uow.session, submission)
    if attempt is not None:
        await repo.set_attempt(uow.session, attempt.id, status=AttemptStatus.PENDING, tries=attempt.tries - 1,
                               lease_until=None, next_in_s=0)


def _with_request_id(found: ProcessorObject, attempt_id: uuid.UUID) -> ProcessorObject:
    """The answer to a request we sent is about that request, whatever the processor echoes."""
    if found.request_id == attempt_id:
        return found
    return ProcessorObject(kind=found.kind, processor_object_id=found.processor_object_id, request_id=attempt_id,
                           state=found.state, failure_reason=found.failure_reason, value_date=found.value_date)


# ── the janitor ─────────────────────────────────────────────────────────────────────


async def claim_checks(*, uow: UnitOfWork, limit: int, stuck_after_s: float, recheck_s: float) -> list[repo.Attempt]:
    return await repo.claim_attempts_to_check(uow.session, limit=limit, stuck_after_s=stuck_after_s,
                                              recheck_s=recheck_s)


async def record_check(*, uow: UnitOfWork, attempt: repo.Attempt, found: ProcessorObject | None) -> str:
    """What the processor said about an attempt we were unsure of."""
    if found is not None:
        update = ProcessorUpdate(processor=attempt.processor, event_id=f"poll:{attempt.id}:{found.state}",
                                 event_type=f"{found.kind}.polled", object=_with_request_id(found, attempt.id))
        outcome = await apply_processor_update(uow=uow, update=update, actor="job:janitor")
        return str(outcome)
    current = await repo.get_attempt(uow.session, attempt.id, for_update=True)
    if current is not None and current.status is AttemptStatus.UNKNOWN:
        # The processor confirms it never received the request: sending it again (under
        # the same id) cannot pay twice. `tries` stays as it is: the attempt keeps its
        # place in the slow lane (one try per janitor round), and a payment whose request
        # once left is never cancellable.
        await repo.set_attempt(uow.session, attempt.id, status=AttemptStatus.PENDING, next_in_s=0,
                               last_error="processor has no record of it; resending")
        return "requeued"
    if current is not None and current.status is AttemptStatus.SUBMITTED:
        log.error("processor has no record of a submitted %s", attempt.kind,
                  extra={"payment_id": str(attempt.payment_id), "attempt_id": str(attempt.id)})
        return "missing_at_processor"
    return "nothing_to_do"
