"""The approvals domain: policies that decide how much approval a subject needs, and
approval requests that collect decisions until they are granted, rejected or expire.

    subject ──▶ Policy.evaluate ──▶ first matching Rule
                                      ├─ required_approvals = 0 → request granted at once (system:policy)
                                      └─ N > 0 → request pending ──decide──▶ Nth distinct approval → granted
                                                                 │           any reject           → rejected
                                                                 └─expire──▶ deadline passed      → expired

Plain classes and pure functions, no I/O and no clock: time is always passed in. Every
transition checks its invariant and records the event that makes it auditable; the same
events rebuild the state (`rebuild`), which is how `verify` proves the tables honest.

This module must never let the maker (or whoever filed the request) decide, count one
principal twice, change an outcome once reached, or evaluate a policy that is not total.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from shared.events import Aggregate, DomainEvent
from shared.money import MAX_AMOUNT_MINOR, exponent

AGGREGATE = "approval_request"
POLICY_AGGREGATE = "approval_policy"

REQUESTED = "approval.requested.v1"
DECIDED = "approval.decided.v1"
GRANTED = "approval.granted.v1"
REJECTED = "approval.rejected.v1"
EXPIRED = "approval.expired.v1"
ESCALATED = "approval.escalated.v1"
POLICY_CHANGED = "approval_policy.changed.v1"

POLICY_ACTOR = "system:policy"
EXPIRY_ACTOR = "job:approval-expiry"
ESCALATION_ACTOR = "job:approval-escalation"

PAYMENT = "payment"  # the subject type whose requests come from payment.created only
MAX_REQUIRED_APPROVALS = 10
MAX_RULES = 50
# Whole major units times 10^4 (the largest ISO 4217 exponent) must stay a valid amount.
MAX_WHOLE_MAJOR_UNITS = MAX_AMOUNT_MINOR // 10**4
SUBJECT_TYPE = re.compile(r"[a-z][a-z0-9_]{0,62}")
RULE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")

# The deterministic namespace of policy ids: one policy id per (tenant, subject type), so
# every version of it, the built-in default included, shares the id.
_POLICY_NAMESPACE = uuid.UUID("6f1c1d52-8e4b-4f7e-9b38-0d7c2f3a9a11")


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    GRANTED = "granted"
    REJECTED = "rejected"
    EXPIRED = "expired"


class Verdict(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"


# ── refusals (the service maps them to HTTP problems) ─────────────────────────────────


class DecisionRefused(Exception):
    """A decision the rules of the request do not allow; nothing was recorded."""


class MakerMayNotDecide(DecisionRefused):
    pass


class RequestNotPending(DecisionRefused):
    def __init__(self, status: ApprovalStatus) -> None:
        super().__init__(f"the request is already {status}")
        self.status = status


class RequestPastDeadline(DecisionRefused):
    def __init__(self, expires_at: datetime) -> None:
        super().__init__(f"the request expired at {expires_at.isoformat()}")
        self.expires_at = expires_at


class NotAnEligibleApprover(DecisionRefused):
    pass


class AlreadyDecided(DecisionRefused):
    pass


class InvalidPolicy(ValueError):
    """A policy that could not decide every subject, or could never be satisfied."""


# ── policies ─────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Subject:
    """What is to be approved, as a policy sees it."""

    tenant_id: str
    subject_type: str
    subject_id: str
    amount: int | None
    currency: str | None
    metadata: Mapping[str, Any]
    maker: str
    requested_by: str

    def __post_init__(self) -> None:
        if (self.amount is None) != (self.currency is None):
            raise ValueError("a subject has both an amount and a currency, or neither")
        if self.currency is not None:
            exponent(self.currency)  # refuses anything but an active ISO 4217 code

    @property
    def payment_id(self) -> str | None:
        return self.subject_id if self.subject_type == PAYMENT else None


@dataclass(frozen=True)
class AmountThreshold:
    """An amount per currency. `minor_units` names currencies explicitly (EUR: 100000 is
    1,000.00 EUR); `whole_major_units` applies to every other currency and is scaled by
    that currency's exponent (1000 → 100000 EUR, 1000 JPY, 1000000 KWD), so one policy
    can speak of "1,000.00" without pretending currencies share a precision."""

    minor_units: Mapping[str, int] = field(default_factory=dict)
    whole_major_units: int | None = None

    def __post_init__(self) -> None:
        if not self.minor_units and self.whole_major_units is None:
            raise InvalidPolicy("an amount threshold names at least one currency or whole_major_units")
        for currency, amount in self.minor_units.items():
            exponent(currency)
            if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_AMOUNT_MINOR:
                raise InvalidPolicy(f"the threshold for {currency} must be 1..{MAX_AMOUNT_MINOR} minor units")
        major = self.whole_major_units
        if major is not None and (isinstance(major, bool) or not isinstance(major, int)
                                  or not 0 < major <= MAX_WHOLE_MAJOR_UNITS):
            raise InvalidPolicy(f"whole_major_units must be 1..{MAX_WHOLE_MAJOR_UNITS}")

    def in_minor_units(self, currency: str) -> int | None:
        """The threshold for `currency`, or None when it says nothing about that currency."""
        if currency in self.minor_units:
            return self.minor_units[currency]
        if self.whole_major_units is None:
            return None
        return self.whole_major_units * 10 ** exponent(currency)

    def to_document(self) -> dict[str, Any]:
        return {"minor_units": dict(sorted(self.minor_units.items())), "whole_major_units": self.whole_major_units}

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> AmountThreshold:
        return cls(minor_units=dict(doc.get("minor_units") or {}), whole_major_units=doc.get("whole_major_units"))


@dataclass(frozen=True)
class Conditions:
    """All given conditions must hold (an empty set of conditions matches everything).
    A subject without an amount never matches an amount condition: a rule about amounts
    says nothing about things that have none."""

    amount_at_least: AmountThreshold | None = None
    amount_below: AmountThreshold | None = None
    currencies: frozenset[str] | None = None
    metadata: Mapping[str, str] | None = None
    created_by: frozenset[str] | None = None

    @property
    def match_everything(self) -> bool:
        return (self.amount_at_least is None and self.amount_below is None and self.currencies is None
                and not self.metadata and self.created_by is None)

    def matches(self, subject: Subject) -> bool:
        if self.currencies is not None and subject.currency not in self.currencies:
            return False
        if self.amount_at_least is not None and not _compare(subject, self.amount_at_least, at_least=True):
            return False
        if self.amount_below is not None and not _compare(subject, self.amount_below, at_least=False):
            return False
        if self.metadata and any(subject.metadata.get(key) != value for key, value in self.metadata.items()):
            return False
        if self.created_by is not None and subject.maker not in self.created_by:
            return False
        return True

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.amount_at_least is not None:
            doc["amount_at_least"] = self.amount_at_least.to_document()
        if self.amount_below is not None:
            doc["amount_below"] = self.amount_below.to_document()
        if self.currencies is not None:
            doc["currencies"] = sorted(self.currencies)
        if self.metadata:
            doc["metadata"] = dict(sorted(self.metadata.items()))
        if self.created_by is not None:
            doc["created_by"] = sorted(self.created_by)
        return doc

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Conditions:
        def threshold(key: str) -> AmountThreshold | None:
            return AmountThreshold.from_document(doc[key]) if doc.get(key) is not None else None

        return cls(
            amount_at_least=threshold("amount_at_least"),
            amount_below=threshold("amount_below"),
            currencies=frozenset(doc["currencies"]) if doc.get("currencies") is not None else None,
            metadata=dict(doc["metadata"]) if doc.get("metadata") else None,
            created_by=frozenset(doc["created_by"]) if doc.get("created_by") is not None else None,
        )


def _compare(subject: Subject, threshold: AmountThreshold, *, at_least: bool) -> bool:
    if subject.amount is None or subject.currency is None:
        return False
    limit = threshold.in_minor_units(subject.currency)
    if limit is None:
        return False
    return subject.amount >= limit if at_least else subject.amount < limit


@dataclass(frozen=True)
class Rule:
    """What a matching subject needs: `required_approvals` distinct approvals (0 means
    approved by the policy itself), from principals holding one of `approver_scopes` (if
    any are named) and listed in `approver_principals` (if any are named)."""

    name: str
    required_approvals: int
    conditions: Conditions = Conditions()
    approver_scopes: tuple[str, ...] = ()
    approver_principals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not RULE_NAME.fullmatch(self.name):
            raise InvalidPolicy(f"rule name {self.name!r} must be snake_case, at most 63 characters")
        required = self.required_approvals
        if isinstance(required, bool) or not isinstance(required, int) or not 0 <= required <= MAX_REQUIRED_APPROVALS:
            raise InvalidPolicy(f"rule {self.name}: required_approvals must be 0..{MAX_REQUIRED_APPROVALS}")
        if self.approver_principals and len(set(self.approver_principals)) < required:
            # The quorum could never be reached: every request under this rule would expire.
            raise InvalidPolicy(f"rule {self.name}: {required} approvals required but only "
                                f"{len(set(self.approver_principals))} approver_principals named")

    def to_document(self) -> dict[str, Any]:
        return {"name": self.name, "conditions": self.conditions.to_document(),
                "required_approvals": self.required_approvals,
                "approver_scopes": list(self.approver_scopes), "approver_principals": list(self.approver_principals)}

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Rule:
        return cls(name=doc["name"], required_approvals=doc["required_approvals"],
                   conditions=Conditions.from_document(doc.get("conditions") or {}),
                   approver_scopes=tuple(doc.get("approver_scopes") or ()),
                   approver_principals=tuple(doc.get("approver_principals") or ()))


@dataclass(frozen=True)
class Policy:
    """One version of a tenant's policy for one subject type: ordered rules, first match
    wins. The last rule matches everything, so a policy decides every subject. Version 0
    is the built-in default of the design; stored versions start at 1."""

    id: uuid.UUID
    tenant_id: str
    subject_type: str
    version: int
    rules: tuple[Rule, ...]
    expire_after_seconds: int | None = None  # None: the service's configured default
    escalate_after_seconds: int | None = None  # None: no escalation notice
    created_by: str | None = None
    reason: str | None = None
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        validate_rules(self.rules)
        validate_timers(self.expire_after_seconds, self.escalate_after_seconds)

    def evaluate(self, subject: Subject) -> Rule:
        for rule in self.rules:
            if rule.conditions.matches(subject):
                return rule
        raise AssertionError("unreachable: the last rule of a policy matches everything")

    @property
    def is_default(self) -> bool:
        return self.version == 0

    def document(self) -> dict[str, Any]:
        return {"rules": [rule.to_document() for rule in self.rules],
                "expire_after_seconds": self.expire_after_seconds,
                "escalate_after_seconds": self.escalate_after_seconds}

    def next_version(self, *, rules: Iterable[Rule], expire_after_seconds: int | None,
                     escalate_after_seconds: int | None, changed_by: str, reason: str,
                     now: datetime) -> tuple[Policy, DomainEvent]:
        """The version that replaces this one, and the event that audits the change.
        Requests already open keep the version they were opened with."""
        new = Policy(id=self.id, tenant_id=self.tenant_id, subject_type=self.subject_type, version=self.version + 1,
                     rules=tuple(rules), expire_after_seconds=expire_after_seconds,
                     escalate_after_seconds=escalate_after_seconds, created_by=changed_by, reason=reason,
                     created_at=now)
        payload = {"policy_id": str(new.id), "subject_type": new.subject_type, "version": new.version,
                   "previous_version": self.version, "changed_by": changed_by, **new.document()}
        event = DomainEvent(POLICY_CHANGED, POLICY_AGGREGATE, str(new.id), payload, tenant_id=new.tenant_id,
                            reason=reason, occurred_at=now)
        return new, event


def validate_rules(rules: tuple[Rule, ...] | list[Rule]) -> None:
    if not rules:
        raise InvalidPolicy("a policy has at least one rule")
    if len(rules) > MAX_RULES:
        raise InvalidPolicy(f"a policy has at most {MAX_RULES} rules")
    names = [rule.name for rule in rules]
    if len(set(names)) != len(names):
        raise InvalidPolicy("rule names must be unique within a policy")
    if not rules[-1].conditions.match_everything:
        raise InvalidPolicy("the last rule must have no conditions, so the policy decides every subject")


MIN_EXPIRY_S = 60
MAX_EXPIRY_S = 90 * 24 * 3600


def validate_timers(expire_after_seconds: int | None, escalate_after_seconds: int | None) -> None:
    for name, value in (("expire_after_seconds", expire_after_seconds),
                        ("escalate_after_seconds", escalate_after_seconds)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not MIN_EXPIRY_S <= value <= MAX_EXPIRY_S):
            raise InvalidPolicy(f"{name} must be {MIN_EXPIRY_S}..{MAX_EXPIRY_S} seconds")
    if escalate_after_seconds is not None and expire_after_seconds is not None \
            and escalate_after_seconds >= expire_after_seconds:
        raise InvalidPolicy("escalate_after_seconds must be shorter than expire_after_seconds")


def policy_id_for(tenant_id: str, subject_type: str) -> uuid.UUID:
    return uuid.uuid5(_POLICY_NAMESPACE, f"{tenant_id}\x00{subject_type}")


DEFAULT_RULES = (
    # The design's default: from 10,000.00 two distinct approvers, from 1,000.00 one,
    # below 1,000.00 the policy approves; "1,000.00" in each currency's own precision.
    Rule("two_approvers_from_10000", 2, Conditions(amount_at_least=AmountThreshold(whole_major_units=10_000))),
    Rule("one_approver_from_1000", 1, Conditions(amount_at_least=AmountThreshold(whole_major_units=1_000))),
    Rule("auto_below_1000", 0, Conditions(amount_below=AmountThreshold(whole_major_units=1_000))),
    # Subjects without an amount (a new payee, say) are never waved through by default.
    Rule("one_approver_without_amount", 1),
)


def default_policy(tenant_id: str, subject_type: str) -> Policy:
    return Policy(id=policy_id_for(tenant_id, subject_type), tenant_id=tenant_id, subject_type=subject_type,
                  version=0, rules=DEFAULT_RULES, reason="the default policy of the design")


# ── approval requests ────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class DecisionRecord:
    id: uuid.UUID
    principal: str
    verdict: Verdict
    reason: str | None
    decided_at: datetime
    correlation_id: str | None


@dataclass(eq=False)
class ApprovalRequest(Aggregate):
    """One subject's way to an outcome. Everything the rule said is copied onto the
    request when it opens, so a later policy version never changes an open request."""

    id: uuid.UUID
    tenant_id: str
    subject_type: str
    subject_id: str
    amount: int | None
    currency: str | None
    metadata: dict[str, Any]
    maker: str
    requested_by: str
    policy_id: uuid.UUID
    policy_version: int
    rule: str
    required_approvals: int
    approver_scopes: tuple[str, ...]
    approver_principals: tuple[str, ...]
    status: ApprovalStatus
    created_at: datetime
    expires_at: datetime | None
    escalate_at: datetime | None
    correlation_id: str | None
    escalated_at: datetime | None = None
    resolved_at: datetime | None = None
    decisions: list[DecisionRecord] = field(default_factory=list)
    events: list[DomainEvent] = field(default_factory=list, repr=False)

    # ── opening ──
    @classmethod
    def open(cls, *, subject: Subject, policy: Policy, now: datetime, default_expire_after_s: int,
             correlation_id: str | None, approval_id: uuid.UUID | None = None) -> ApprovalRequest:
        """Evaluate `policy` for `subject`: granted at once when the matching rule needs no
        approval (recorded as the policy's act), else pending until decided or expired."""
        rule = policy.evaluate(subject)
        auto = rule.required_approvals == 0
        expire_after = policy.expire_after_seconds or default_expire_after_s
        escalate_after = policy.escalate_after_seconds
        request = cls(
            id=approval_id or uuid.uuid4(), tenant_id=subject.tenant_id, subject_type=subject.subject_type,
            subject_id=subject.subject_id, amount=subject.amount, currency=subject.currency,
            metadata=dict(subject.metadata), maker=subject.maker, requested_by=subject.requested_by,
            policy_id=policy.id, policy_version=policy.version, rule=rule.name,
            required_approvals=rule.required_approvals, approver_scopes=rule.approver_scopes,
            approver_principals=rule.approver_principals,
            status=ApprovalStatus.GRANTED if auto else ApprovalStatus.PENDING, created_at=now,
            expires_at=None if auto else now + timedelta(seconds=expire_after),
            escalate_at=None if auto or escalate_after is None or escalate_after >= expire_after
            else now + timedelta(seconds=escalate_after),
            correlation_id=correlation_id, resolved_at=now if auto else None,
        )
        if auto:
            request._record(GRANTED, {**request.snapshot(), "approvers": [], "auto": True}, now,
                            actor=POLICY_ACTOR,
                            reason=f"rule {rule.name} of policy version {policy.version} approves without review")
        else:
            request._record(REQUESTED, request.snapshot(), now,
                            reason=f"rule {rule.name} of policy version {policy.version} requires "
                                   f"{rule.required_approvals} approval{'s' if rule.required_approvals > 1 else ''}")
        return request

    # ── deciding ──
    @property
    def approvers(self) -> list[str]:
        return [d.principal for d in self.decisions if d.verdict is Verdict.APPROVE]

    def is_maker(self, principal: str) -> bool:
        return principal in (self.maker, self.requested_by)

    def may_decide(self, principal: str, scopes: frozenset[str]) -> bool:
        if self.approver_principals and principal not in self.approver_principals:
            return False
        if self.approver_scopes and not scopes.intersection(self.approver_scopes):
            return False
        return True

    def decide(self, *, principal: str, scopes: frozenset[str], verdict: Verdict, reason: str | None,
               now: datetime, correlation_id: str | None, decision_id: uuid.UUID | None = None) -> DecisionRecord:
        """Record one principal's decision. Any reject rejects; the Nth distinct approval
        grants. Refusals record nothing."""
        if verdict is Verdict.REJECT and not reason:
            raise ValueError("a rejection states its reason")
        if self.is_maker(principal):
            raise MakerMayNotDecide("the maker of a request can never decide it")
        if self.status is not ApprovalStatus.PENDING:
            raise RequestNotPending(self.status)
        if self.expires_at is not None and now >= self.expires_at:
            raise RequestPastDeadline(self.expires_at)
        if not self.may_decide(principal, scopes):
            raise NotAnEligibleApprover(f"{principal} is not an approver the rule {self.rule} allows")
        if any(d.principal == principal for d in self.decisions):
            raise AlreadyDecided(f"{principal} has already decided this request")
        record = DecisionRecord(id=decision_id or uuid.uuid4(), principal=principal, verdict=verdict, reason=reason,
                                decided_at=now, correlation_id=correlation_id)
        self.decisions.append(record)
        self._record(DECIDED, {**self._subject_ref(), "decision_id": str(record.id), "principal": principal,
                               "decision": verdict.value, "reason": reason, "approvals": len(self.approvers),
                               "required_approvals": self.required_approvals}, now, reason=reason)
        if verdict is Verdict.REJECT:
            self._resolve(ApprovalStatus.REJECTED, now)
            self._record(REJECTED, {**self._subject_ref(), "rejected_by": principal, "reason": reason}, now,
                         reason=reason)
        elif len(self.approvers) >= self.required_approvals:
            self._resolve(ApprovalStatus.GRANTED, now)
            self._record(GRANTED, {**self.snapshot(), "approvers": self.approvers, "auto": False}, now,
                         reason=f"{len(self.approvers)} of {self.required_approvals} approvals")
        return record

    # ── timers ──
    def expire(self, *, now: datetime) -> None:
        if self.status is not ApprovalStatus.PENDING or self.expires_at is None or now < self.expires_at:
            raise RequestNotPending(self.status)  # the job only picks overdue pending requests
        self._resolve(ApprovalStatus.EXPIRED, now)
        self._record(EXPIRED, {**self._subject_ref(), "approvers": self.approvers,
                               "required_approvals": self.required_approvals,
                               "expires_at": self.expires_at.isoformat()}, now, actor=EXPIRY_ACTOR,
                     reason=f"not decided by {self.expires_at.isoformat()}")

    def escalate(self, *, now: datetime) -> None:
        """The notice that a request is close to its deadline: once, and only while pending."""
        if self.status is not ApprovalStatus.PENDING or self.escalated_at is not None \
                or self.escalate_at is None or now < self.escalate_at:
            raise RequestNotPending(self.status)
        self.escalated_at = now
        self._record(ESCALATED, {**self._subject_ref(), "approvers": self.approvers,
                                 "required_approvals": self.required_approvals,
                                 "expires_at": self.expires_at.isoformat() if self.expires_at else None}, now,
                     actor=ESCALATION_ACTOR, reason="close to its deadline without a decision")

    # ── events ──
    def _resolve(self, status: ApprovalStatus, now: datetime) -> None:
        self.status = status
        self.resolved_at = now

    def _subject_ref(self) -> dict[str, Any]:
        return {"approval_id": str(self.id), "subject_type": self.subject_type, "subject_id": self.subject_id,
                "payment_id": self.subject_id if self.subject_type == PAYMENT else None}

    def snapshot(self) -> dict[str, Any]:
        """Everything the request was opened with: enough to rebuild it from its first event."""
        return {
            **self._subject_ref(), "amount": self.amount, "currency": self.currency, "metadata": self.metadata,
            "maker": self.maker, "requested_by": self.requested_by, "policy_id": str(self.policy_id),
            "policy_version": self.policy_version, "rule": self.rule, "required_approvals": self.required_approvals,
            "approver_scopes": list(self.approver_scopes), "approver_principals": list(self.approver_principals),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "escalate_at": self.escalate_at.isoformat() if self.escalate_at else None,
        }

    def _record(self, event_type: str, payload: dict[str, Any], now: datetime, *, actor: str | None = None,
                reason: str | None = None) -> None:
        self.record(DomainEvent(event_type, AGGREGATE, str(self.id), payload, tenant_id=self.tenant_id, actor=actor,
                                reason=reason, occurred_at=now))

    def pull_events(self) -> list[DomainEvent]:
        events, self.events = self.events, []
        return events

    @classmethod
    def from_snapshot(cls, payload: Mapping[str, Any], *, tenant_id: str, occurred_at: datetime,
                      correlation_id: str | None, status: ApprovalStatus) -> ApprovalRequest:
        return cls(
            id=uuid.UUID(payload["approval_id"]), tenant_id=tenant_id, subject_type=payload["subject_type"],
            subject_id=payload["subject_id"], amount=payload["amount"], currency=payload["currency"],
            metadata=dict(payload["metadata"]), maker=payload["maker"], requested_by=payload["requested_by"],
            policy_id=uuid.UUID(payload["policy_id"]), policy_version=payload["policy_version"], rule=payload["rule"],
            required_approvals=payload["required_approvals"], approver_scopes=tuple(payload["approver_scopes"]),
            approver_principals=tuple(payload["approver_principals"]), status=status, created_at=occurred_at,
            expires_at=_time(payload["expires_at"]), escalate_at=_time(payload["escalate_at"]),
            correlation_id=correlation_id, resolved_at=occurred_at if status is not ApprovalStatus.PENDING else None,
        )


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


# ── rebuilding the state from the event log ──────────────────────────────────────────


@dataclass(frozen=True)
class LoggedEvent:
    """A row of the event log, as far as rebuilding needs it."""

    type: str
    aggregate_id: str
    tenant_id: str
    payload: Mapping[str, Any]
    occurred_at: datetime
    correlation_id: str | None
    reason: str | None = None


@dataclass
class Rebuilt:
    requests: dict[uuid.UUID, ApprovalRequest] = field(default_factory=dict)
    policies: dict[uuid.UUID, dict[int, Policy]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def rebuild(events: Iterable[LoggedEvent]) -> Rebuilt:
    """Fold the log (in seq order) into requests, decisions and policy versions. Events
    that contradict the state so far are reported, not applied."""
    state = Rebuilt()
    for event in events:
        payload = event.payload
        if event.type == POLICY_CHANGED:
            policy = Policy(
                id=uuid.UUID(payload["policy_id"]), tenant_id=event.tenant_id, subject_type=payload["subject_type"],
                version=payload["version"], rules=tuple(Rule.from_document(r) for r in payload["rules"]),
                expire_after_seconds=payload["expire_after_seconds"],
                escalate_after_seconds=payload["escalate_after_seconds"], created_by=payload["changed_by"],
                reason=event.reason, created_at=event.occurred_at,
            )
            state.policies.setdefault(policy.id, {})[policy.version] = policy
            continue
        approval_id = uuid.UUID(event.aggregate_id)
        request = state.requests.get(approval_id)
        if event.type == REQUESTED or (event.type == GRANTED and payload.get("auto") is True):
            if request is not None:
                state.problems.append(f"approval {approval_id}: opened twice in the event log")
                continue
            status = ApprovalStatus.GRANTED if event.type == GRANTED else ApprovalStatus.PENDING
            state.requests[approval_id] = ApprovalRequest.from_snapshot(
                payload, tenant_id=event.tenant_id, occurred_at=event.occurred_at,
                correlation_id=event.correlation_id, status=status)
            continue
        if request is None:
            state.problems.append(f"approval {approval_id}: {event.type} before the request was opened")
            continue
        if event.type == DECIDED:
            request.decisions.append(DecisionRecord(
                id=uuid.UUID(payload["decision_id"]), principal=payload["principal"],
                verdict=Verdict(payload["decision"]), reason=payload["reason"], decided_at=event.occurred_at,
                correlation_id=event.correlation_id))
        elif event.type in (GRANTED, REJECTED, EXPIRED):
            if request.status is not ApprovalStatus.PENDING:
                state.problems.append(f"approval {approval_id}: {event.type} after it was already {request.status}")
                continue
            request.status = {GRANTED: ApprovalStatus.GRANTED, REJECTED: ApprovalStatus.REJECTED,
                              EXPIRED: ApprovalStatus.EXPIRED}[event.type]
            request.resolved_at = event.occurred_at
        elif event.type == ESCALATED:
            request.escalated_at = event.occurred_at
    return state


def quorum_problems(request: ApprovalRequest) -> list[str]:
    """Invariant 4 for one request: what its outcome would need, checked against its
    decisions. Empty when the request is sound."""
    problems = []
    label = f"approval {request.id}"
    by_makers = [d.principal for d in request.decisions if request.is_maker(d.principal)]
    if by_makers:
        problems.append(f"{label}: decided by its maker {sorted(set(by_makers))}")
    principals = [d.principal for d in request.decisions]
    if len(set(principals)) != len(principals):
        problems.append(f"{label}: one principal decided more than once")
    approvals = {p for p in request.approvers if not request.is_maker(p)}
    rejects = [d for d in request.decisions if d.verdict is Verdict.REJECT]
    if request.status is ApprovalStatus.GRANTED:
        if len(approvals) < request.required_approvals:
            problems.append(f"{label}: granted with {len(approvals)} of {request.required_approvals} "
                            "distinct non-maker approvals")
        if rejects:
            problems.append(f"{label}: granted although rejected")
    if request.status is ApprovalStatus.REJECTED and len(rejects) != 1:
        problems.append(f"{label}: rejected with {len(rejects)} rejections")
    if request.status is ApprovalStatus.PENDING and (rejects or (request.required_approvals
                                                                 and len(approvals) >= request.required_approvals)):
        problems.append(f"{label}: still pending although its outcome is decided")
    return problems
