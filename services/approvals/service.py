"""Use cases of the approvals service and the errors they answer with.

Each use case runs inside a unit of work it is given (`uow`): it loads, asks the domain,
writes the projection and hands the recorded events to the unit of work. It never
commits, never reads another tenant's rows and never decides anything the domain did
not: segregation of duties, quorum and finality live in `domain.py` (and, as a backstop,
in the database's triggers).
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from prometheus_client import Counter

from services.approvals import domain, repository
from services.approvals.domain import ApprovalRequest, ApprovalStatus, Policy, Rule, Subject, Verdict
from services.approvals.repository import PageCursor
from services.approvals.schemas import PaymentCreatedPayload
from shared import context
from shared.errors import BadRequest, Conflict, Forbidden, NotFound, ServiceUnavailable
from shared.inbox import Bound, Delivery
from shared.uow import UnitOfWork

log = logging.getLogger(__name__)

OUTCOMES = Counter("clearhouse_approvals_outcomes_total", "Approval requests that reached an outcome",
                   ["outcome", "auto"])
DECISIONS = Counter("clearhouse_approvals_decisions_total", "Decisions recorded", ["decision"])
REFUSED_DECISIONS = Counter("clearhouse_approvals_refused_decisions_total", "Decisions refused, by code", ["code"])


# ── errors ───────────────────────────────────────────────────────────────────────────


class ApprovalNotFound(NotFound):
    code, title = "approval_not_found", "Approval request not found"


class MakerCannotDecide(Forbidden):
    code, title = "maker_cannot_decide", "The maker cannot decide"


class NotAnEligibleApprover(Forbidden):
    code, title = "not_an_eligible_approver", "Not an eligible approver"


class ApprovalNotPending(Conflict):
    code, title = "approval_not_pending", "Approval request already decided"


class ApprovalExpired(Conflict):
    code, title = "approval_expired", "Approval request expired"


class DuplicateDecision(Conflict):
    code, title = "duplicate_decision", "Already decided by this principal"


class ApprovalRequestExists(Conflict):
    code, title = "approval_request_exists", "The subject already has an approval request"


class PolicyVersionNotFound(NotFound):
    code, title = "policy_version_not_found", "Policy version not found"


class PolicyVersionConflict(Conflict):
    code, title = "policy_version_conflict", "The policy changed meanwhile"


class InvalidCursor(BadRequest):
    code, title = "invalid_cursor", "Invalid cursor"


class MalformedPaymentCreated(ValueError):
    """A payment.created the contract does not allow: it cannot be evaluated safely (no
    maker, no amount), so it is retried and then parked in the DLQ for a person."""


def _refusal(exc: domain.DecisionRefused) -> Exception:
    if isinstance(exc, domain.MakerMayNotDecide):
        return MakerCannotDecide("The maker of a request can never approve or reject it.")
    if isinstance(exc, domain.RequestNotPending):
        return ApprovalNotPending(f"The approval request is already {exc.status}; it takes no more decisions.",
                                  approval_status=exc.status.value)
    if isinstance(exc, domain.RequestPastDeadline):
        return ApprovalExpired(f"The approval request expired at {exc.expires_at.isoformat()}.",
                               expires_at=exc.expires_at.isoformat())
    if isinstance(exc, domain.NotAnEligibleApprover):
        return NotAnEligibleApprover("The rule that opened this request does not let you decide it.")
    if isinstance(exc, domain.AlreadyDecided):
        return DuplicateDecision("You have already decided this request; one principal counts once.")
    raise AssertionError(f"unmapped refusal {type(exc).__name__}")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ── opening requests ─────────────────────────────────────────────────────────────────


class PolicyCache:
    """Process-local memory of the policy version last seen per (tenant, subject type).

    Only a guess: `repository.open_request` inserts a request only if the version it was
    evaluated under is still the current one, and a version never changes once written,
    so a stale entry costs one more round trip, never a wrong evaluation. It saves the
    policy lookup on the hot path (one statement per payment.created instead of two)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], Policy] = OrderedDict()

    def get(self, tenant_id: str, subject_type: str) -> Policy:
        key = (tenant_id, subject_type)
        policy = self._entries.get(key)
        if policy is None:
            return domain.default_policy(tenant_id, subject_type)
        self._entries.move_to_end(key)
        return policy

    def remember(self, policy: Policy) -> None:
        self._entries[(policy.tenant_id, policy.subject_type)] = policy
        self._entries.move_to_end((policy.tenant_id, policy.subject_type))
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class PolicyKeptChanging(ServiceUnavailable):
    """The tenant's policy changed on every attempt to open one request: retry shortly
    (the consumer retries the message; an API caller gets a 503 with Retry-After)."""

    code, title = "policy_changing", "The policy is changing"


async def _open(*, uow: UnitOfWork, subject: Subject, default_expire_after_s: int,
                policies: PolicyCache) -> ApprovalRequest | None:
    """Evaluate the tenant's current policy and open the request; None when the subject
    already has one (its events are then dropped, never written)."""
    policy = policies.get(subject.tenant_id, subject.subject_type)
    for _ in range(3):
        request = ApprovalRequest.open(subject=subject, policy=policy, now=utcnow(),
                                       default_expire_after_s=default_expire_after_s,
                                       correlation_id=context.current().correlation_id)
        attempt = await repository.open_request(uow.session, request)
        if attempt.opened:
            uow.add(*request.pull_events())
            if request.status is ApprovalStatus.GRANTED:
                uow.after_commit(lambda: OUTCOMES.labels("granted", "true").inc())
            return request
        if attempt.current_version == policy.version:
            return None  # evaluated under the current policy, refused by one-request-per-subject
        policy = await get_policy(uow=uow, tenant_id=subject.tenant_id, subject_type=subject.subject_type,
                                  version=attempt.current_version)
        policies.remember(policy)
    raise PolicyKeptChanging(f"The {subject.subject_type} policy changed while the request was being opened; "
                             "retry shortly.", headers={"Retry-After": "1"})


def _payment_subject(*, tenant_id: str | None, actor: str | None, payload: Mapping[str, Any]) -> Subject:
    if not tenant_id:
        raise MalformedPaymentCreated("payment.created without a tenant")
    try:
        created = PaymentCreatedPayload.model_validate(payload)
    except ValueError as exc:
        raise MalformedPaymentCreated(f"payment.created does not match the contract: {exc}") from None
    actor_principal = actor.removeprefix("user:") if actor and actor.startswith("user:") else None
    maker = created.created_by or actor_principal
    if not maker:
        raise MalformedPaymentCreated("payment.created names no maker (created_by), so no one could be kept "
                                      "from approving their own payment")
    return Subject(tenant_id=tenant_id, subject_type=domain.PAYMENT, subject_id=created.payment_id,
                   amount=created.amount, currency=created.currency, metadata=created.metadata or {},
                   maker=maker, requested_by=actor_principal or maker)


def _duplicate_ignored(subject: Subject) -> None:
    log.info("payment %s already has an approval request; duplicate payment.created ignored",
             subject.subject_id, extra={"payment_id": subject.subject_id})


async def open_for_payment(*, uow: UnitOfWork, tenant_id: str | None, actor: str | None,
                           payload: Mapping[str, Any], default_expire_after_s: int,
                           policies: PolicyCache) -> ApprovalRequest | None:
    """payment.created → the payment's approval request (granted at once or pending).
    A second payment.created for the same payment (another event id) changes nothing."""
    subject = _payment_subject(tenant_id=tenant_id, actor=actor, payload=payload)
    request = await _open(uow=uow, subject=subject, default_expire_after_s=default_expire_after_s,
                          policies=policies)
    if request is None:
        _duplicate_ignored(subject)
    return request


async def open_for_payments(*, uow: UnitOfWork, deliveries: Sequence[Delivery], bound: Bound,
                            default_expire_after_s: int, policies: PolicyCache) -> None:
    """`open_for_payment` for a run of payment.created messages, with one statement for
    all of them instead of one each. Every message gets what `open_for_payment` would
    give it: its request opened under the current policy (its events recorded in its own
    context), or nothing for a duplicate; a request whose cached policy version turned
    out stale is opened again alone, under the current one."""
    now = utcnow()
    subjects = [_payment_subject(tenant_id=d.event.tenant_id, actor=d.event.actor, payload=d.event.data)
                for d in deliveries]
    requests = [ApprovalRequest.open(subject=subject, policy=policies.get(subject.tenant_id, subject.subject_type),
                                     now=now, default_expire_after_s=default_expire_after_s,
                                     correlation_id=d.event.correlation_id or str(d.event.id))
                for d, subject in zip(deliveries, subjects, strict=True)]
    attempts = await repository.open_requests(uow.session, requests)
    for delivery, subject, request, attempt in zip(deliveries, subjects, requests, attempts, strict=True):
        with bound(delivery):
            if attempt.opened:
                uow.add(*request.pull_events())
                if request.status is ApprovalStatus.GRANTED:
                    uow.after_commit(lambda: OUTCOMES.labels("granted", "true").inc())
            elif attempt.current_version == request.policy_version:
                _duplicate_ignored(subject)
            elif await _open(uow=uow, subject=subject, default_expire_after_s=default_expire_after_s,
                             policies=policies) is None:
                _duplicate_ignored(subject)


async def request_approval(*, uow: UnitOfWork, tenant_id: str, principal: str, subject_type: str,
                           subject_id: str, amount: int | None, currency: str | None, metadata: Mapping[str, str],
                           created_by: str | None, default_expire_after_s: int,
                           policies: PolicyCache) -> ApprovalRequest:
    """A generic approval request over the API. The caller and `created_by` are both
    makers: neither may decide it."""
    subject = Subject(tenant_id=tenant_id, subject_type=subject_type, subject_id=subject_id, amount=amount,
                      currency=currency, metadata=dict(metadata), maker=created_by or principal,
                      requested_by=principal)
    request = await _open(uow=uow, subject=subject, default_expire_after_s=default_expire_after_s,
                          policies=policies)
    if request is None:
        existing = await repository.request_id_for_subject(uow.session, tenant_id=tenant_id,
                                                           subject_type=subject_type, subject_id=subject_id)
        raise ApprovalRequestExists(f"{subject_type} {subject_id} already has an approval request.",
                                    approval_id=str(existing))
    return request


# ── deciding ─────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class DecisionOutcome:
    decision: domain.DecisionRecord
    request: ApprovalRequest


async def decide(*, uow: UnitOfWork, tenant_id: str, approval_id: uuid.UUID, principal: str,
                 scopes: frozenset[str], verdict: Verdict, reason: str | None) -> DecisionOutcome:
    """Record one decision under the request's row lock: concurrent deciders queue, so
    the outcome (and its event) is written exactly once."""
    request = await repository.get_request(uow.session, tenant_id=tenant_id, approval_id=approval_id,
                                           for_update=True)
    if request is None:
        raise ApprovalNotFound(f"No approval request {approval_id}.")
    try:
        record = request.decide(principal=principal, scopes=scopes, verdict=verdict, reason=reason, now=utcnow(),
                                correlation_id=context.current().correlation_id)
    except domain.DecisionRefused as exc:
        error = _refusal(exc)
        REFUSED_DECISIONS.labels(error.code).inc()
        raise error from None
    await repository.add_decision(uow.session, request=request, decision=record)
    if request.status is not ApprovalStatus.PENDING:
        await repository.save_progress(uow.session, request)
        uow.after_commit(lambda: OUTCOMES.labels(request.status.value, "false").inc())
    uow.add(*request.pull_events())
    uow.after_commit(lambda: DECISIONS.labels(verdict.value).inc())
    return DecisionOutcome(decision=record, request=request)


# ── reading ──────────────────────────────────────────────────────────────────────────


def encode_cursor(cursor: PageCursor) -> str:
    raw = orjson.dumps([cursor.created_at.isoformat(), str(cursor.id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str) -> PageCursor:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        created_at, approval_id = orjson.loads(raw)
        cursor = PageCursor(datetime.fromisoformat(created_at), uuid.UUID(approval_id))
    except (binascii.Error, orjson.JSONDecodeError, ValueError, TypeError, AttributeError):
        raise InvalidCursor("The cursor is not one this API returned.") from None
    if cursor.created_at.tzinfo is None:
        raise InvalidCursor("The cursor is not one this API returned.")
    return cursor


@dataclass(frozen=True)
class Page:
    requests: list[ApprovalRequest]
    next_cursor: str | None


async def list_approvals(*, uow: UnitOfWork, tenant_id: str, status: ApprovalStatus | None,
                         subject_type: str | None, cursor: str | None, limit: int) -> Page:
    after = decode_cursor(cursor) if cursor else None
    requests, next_page = await repository.list_requests(uow.session, tenant_id=tenant_id, status=status,
                                                         subject_type=subject_type, after=after, limit=limit)
    return Page(requests=requests, next_cursor=encode_cursor(next_page) if next_page else None)


@dataclass(frozen=True)
class ApprovalWithHistory:
    request: ApprovalRequest
    history: list[dict[str, Any]]


async def get_approval(*, uow: UnitOfWork, tenant_id: str, approval_id: uuid.UUID) -> ApprovalWithHistory:
    request = await repository.get_request(uow.session, tenant_id=tenant_id, approval_id=approval_id)
    if request is None:
        raise ApprovalNotFound(f"No approval request {approval_id}.")
    trail = await repository.history(uow.session, tenant_id=tenant_id, approval_id=approval_id)
    return ApprovalWithHistory(request=request, history=trail)


# ── policies ─────────────────────────────────────────────────────────────────────────


async def get_policy(*, uow: UnitOfWork, tenant_id: str, subject_type: str, version: int | None) -> Policy:
    if version is None:
        stored = await repository.current_policy(uow.session, tenant_id=tenant_id, subject_type=subject_type)
        return stored or domain.default_policy(tenant_id, subject_type)
    if version == 0:
        return domain.default_policy(tenant_id, subject_type)
    policy = await repository.policy_version(uow.session, tenant_id=tenant_id, subject_type=subject_type,
                                             version=version)
    if policy is None:
        raise PolicyVersionNotFound(f"The {subject_type} policy has no version {version}.")
    return policy


async def change_policy(*, uow: UnitOfWork, tenant_id: str, subject_type: str, changed_by: str,
                        rules: list[Rule], expire_after_seconds: int | None, escalate_after_seconds: int | None,
                        reason: str, expected_version: int | None) -> Policy:
    """Publish the next version of a tenant's policy, audited as approval_policy.changed.
    Writers of one policy queue on its header row, so versions never collide."""
    session = uow.session
    version = await repository.lock_policy(session, policy_id=domain.policy_id_for(tenant_id, subject_type),
                                           tenant_id=tenant_id, subject_type=subject_type)
    if expected_version is not None and expected_version != version:
        raise PolicyVersionConflict(f"The {subject_type} policy is at version {version}, not {expected_version}.",
                                    current_version=version)
    current = await get_policy(uow=uow, tenant_id=tenant_id, subject_type=subject_type, version=version)
    new, event = current.next_version(rules=rules, expire_after_seconds=expire_after_seconds,
                                      escalate_after_seconds=escalate_after_seconds, changed_by=changed_by,
                                      reason=reason, now=utcnow())
    await repository.add_policy_version(session, policy=new)
    uow.add(event)
    return new


# ── timers ───────────────────────────────────────────────────────────────────────────


async def expire_overdue(*, uow: UnitOfWork, now: datetime, limit: int) -> int:
    """Expire up to `limit` overdue pending requests; returns how many."""
    requests = await repository.lock_overdue(uow.session, now=now, limit=limit)
    for request in requests:
        request.expire(now=now)
        await repository.save_progress(uow.session, request)
        await _write_as_request(uow, request, actor=domain.EXPIRY_ACTOR)
    if requests:
        uow.after_commit(lambda: OUTCOMES.labels("expired", "false").inc(len(requests)))
    return len(requests)


async def escalate_due(*, uow: UnitOfWork, now: datetime, limit: int) -> int:
    """Send the escalation notice of up to `limit` pending requests close to expiry."""
    requests = await repository.lock_escalation_due(uow.session, now=now, limit=limit)
    for request in requests:
        request.escalate(now=now)
        await repository.save_progress(uow.session, request)
        await _write_as_request(uow, request, actor=domain.ESCALATION_ACTOR)
    return len(requests)


async def _write_as_request(uow: UnitOfWork, request: ApprovalRequest, *, actor: str) -> None:
    """A job acts for many tenants in one transaction: each event is written under its own
    request's tenant and correlation id, so a request's timeline stays one story."""
    token = context.bind(tenant_id=request.tenant_id, correlation_id=request.correlation_id, causation_id=None,
                         actor=actor, principal=None)
    try:
        uow.add(*request.pull_events())
        await uow.flush_events()
    finally:
        context.reset(token)

