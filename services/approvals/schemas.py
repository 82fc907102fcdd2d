"""Request and response models of the approvals API, the payloads of the events it
publishes (`EVENT_SCHEMAS`, for the catalogue) and the one it consumes.

Requests are validated strictly: unknown fields, floats for amounts, text PostgreSQL
cannot store (NUL, lone surrogates) and policies that could not decide every subject are
refused here with a 422 that points at the field. Nothing in this module touches the
database or decides anything.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from services.approvals import domain
from services.approvals.domain import ApprovalStatus
from shared.money import AmountMinor, CurrencyCode


def _storable(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold NUL, and asyncpg cannot encode lone surrogates
    # (which stdlib JSON happily decodes from "\ud800"): refuse both here, not with a 500.
    if "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_storable)]
SubjectType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
SubjectId = Annotated[Text, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
PrincipalName = Annotated[Text, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
ScopeName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.:\-]{0,127}$")]
MetadataKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
MetadataValue = Annotated[Text, StringConstraints(max_length=512)]
Reason = Annotated[Text, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=50)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ── approval requests ────────────────────────────────────────────────────────────────


class ApprovalCreate(_Strict):
    """A generic approval request: anything that needs a maker-checker decision."""

    subject_type: SubjectType = Field(description="What kind of thing is to be approved, e.g. payee, ledger_adjustment")
    subject_id: SubjectId = Field(description="Your id of that thing; one approval request per subject")
    amount: AmountMinor | None = None
    currency: CurrencyCode | None = None
    metadata: Metadata = Field(default_factory=dict)
    created_by: PrincipalName | None = Field(
        default=None, description="The principal on whose behalf the request is filed, when not the caller. "
                                  "Neither the caller nor created_by may ever decide it.")

    @model_validator(mode="after")
    def _consistent(self) -> ApprovalCreate:
        if (self.amount is None) != (self.currency is None):
            raise ValueError("amount and currency come together, or not at all")
        if self.subject_type == domain.PAYMENT:
            # Payments are approved from payment.created only: a request filed over the API
            # for a payment id could otherwise pre-empt the real one with a smaller amount.
            raise ValueError("approval requests for payments are opened from payment.created, not over the API")
        return self


class DecisionCreate(_Strict):
    decision: Literal["approve", "reject"]
    reason: Reason | None = Field(default=None, description="Why; required for a rejection")

    @model_validator(mode="after")
    def _reason_for_rejection(self) -> DecisionCreate:
        if self.decision == "reject" and not self.reason:
            raise ValueError("a rejection states its reason")
        return self


class DecisionPublic(BaseModel):
    id: uuid.UUID
    principal: str
    decision: Literal["approve", "reject"]
    reason: str | None
    decided_at: datetime
    correlation_id: str | None


class ApprovalPublic(BaseModel):
    id: uuid.UUID
    subject_type: str
    subject_id: str
    payment_id: str | None = Field(description="The subject when it is a payment")
    status: ApprovalStatus
    required_approvals: int
    approvals: int = Field(description="Distinct approvals so far")
    decisions: list[DecisionPublic]
    amount: int | None
    currency: str | None
    metadata: dict[str, Any]
    maker: str
    requested_by: str
    policy_id: uuid.UUID
    policy_version: int
    rule: str
    approver_scopes: list[str]
    approver_principals: list[str]
    created_at: datetime
    expires_at: datetime | None
    escalate_at: datetime | None
    escalated_at: datetime | None
    resolved_at: datetime | None
    correlation_id: str | None

    @classmethod
    def of(cls, request: domain.ApprovalRequest) -> ApprovalPublic:
        return cls(
            id=request.id, subject_type=request.subject_type, subject_id=request.subject_id,
            payment_id=request.subject_id if request.subject_type == domain.PAYMENT else None,
            status=request.status, required_approvals=request.required_approvals,
            approvals=len(request.approvers),
            decisions=[DecisionPublic(id=d.id, principal=d.principal, decision=d.verdict.value, reason=d.reason,
                                      decided_at=d.decided_at, correlation_id=d.correlation_id)
                       for d in request.decisions],
            amount=request.amount, currency=request.currency, metadata=request.metadata, maker=request.maker,
            requested_by=request.requested_by, policy_id=request.policy_id, policy_version=request.policy_version,
            rule=request.rule, approver_scopes=list(request.approver_scopes),
            approver_principals=list(request.approver_principals), created_at=request.created_at,
            expires_at=request.expires_at, escalate_at=request.escalate_at, escalated_at=request.escalated_at,
            resolved_at=request.resolved_at, correlation_id=request.correlation_id,
        )


class HistoryEvent(BaseModel):
    """One entry of a request's audit trail, straight from the event log."""

    type: str
    occurred_at: datetime
    actor: str
    reason: str | None
    correlation_id: str | None
    data: dict[str, Any]


class ApprovalDetail(ApprovalPublic):
    history: list[HistoryEvent]

    @classmethod
    def of_history(cls, request: domain.ApprovalRequest, history: list[dict[str, Any]]) -> ApprovalDetail:
        return cls(**ApprovalPublic.of(request).model_dump(),
                   history=[HistoryEvent(type=e["type"], occurred_at=e["occurred_at"], actor=e["actor"],
                                         reason=e["reason"], correlation_id=e["correlation_id"], data=e["payload"])
                            for e in history])


class ApprovalList(BaseModel):
    data: list[ApprovalPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class DecisionResult(DecisionPublic):
    approval_id: uuid.UUID
    approval: ApprovalPublic

    @classmethod
    def of(cls, record: domain.DecisionRecord, request: domain.ApprovalRequest) -> DecisionResult:
        return cls(id=record.id, principal=record.principal, decision=record.verdict.value, reason=record.reason,
                   decided_at=record.decided_at, correlation_id=record.correlation_id, approval_id=request.id,
                   approval=ApprovalPublic.of(request))


# ── policies ─────────────────────────────────────────────────────────────────────────


class AmountThresholdSchema(_Strict):
    minor_units: Annotated[dict[CurrencyCode, AmountMinor], Field(max_length=200)] = Field(
        default_factory=dict, description="Threshold per currency in minor units: {\"EUR\": 100000} is 1,000.00 EUR")
    whole_major_units: int | None = Field(
        default=None, gt=0, le=domain.MAX_WHOLE_MAJOR_UNITS, strict=True,
        description="Threshold in whole units of any currency not listed, scaled by its exponent: "
                    "1000 is 1,000.00 EUR (100000), 1,000 JPY (1000), 1,000.000 KWD (1000000)")

    @model_validator(mode="after")
    def _not_empty(self) -> AmountThresholdSchema:
        if not self.minor_units and self.whole_major_units is None:
            raise ValueError("a threshold names at least one currency in minor_units, or whole_major_units")
        return self

    def to_domain(self) -> domain.AmountThreshold:
        return domain.AmountThreshold(minor_units=dict(self.minor_units), whole_major_units=self.whole_major_units)


class ConditionsSchema(_Strict):
    amount_at_least: AmountThresholdSchema | None = None
    amount_below: AmountThresholdSchema | None = None
    currencies: Annotated[list[CurrencyCode], Field(min_length=1, max_length=200)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(min_length=1, max_length=50)] | None = Field(
        default=None, description="Every key must be present on the subject with exactly this value")
    created_by: Annotated[list[PrincipalName], Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="Matches when the subject's maker is one of these principals")

    def to_domain(self) -> domain.Conditions:
        return domain.Conditions(
            amount_at_least=self.amount_at_least.to_domain() if self.amount_at_least else None,
            amount_below=self.amount_below.to_domain() if self.amount_below else None,
            currencies=frozenset(self.currencies) if self.currencies is not None else None,
            metadata=dict(self.metadata) if self.metadata else None,
            created_by=frozenset(self.created_by) if self.created_by is not None else None,
        )


class RuleSchema(_Strict):
    name: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
    conditions: ConditionsSchema = Field(default_factory=ConditionsSchema)
    required_approvals: int = Field(ge=0, le=domain.MAX_REQUIRED_APPROVALS, strict=True,
                                    description="0 approves without review; N needs N distinct approvers")
    approver_scopes: Annotated[list[ScopeName], Field(max_length=20)] = Field(
        default_factory=list, description="If given, an approver must hold one of these scopes "
                                          "(besides approvals:decide)")
    approver_principals: Annotated[list[PrincipalName], Field(max_length=200)] = Field(
        default_factory=list, description="If given, only these principals may decide (a group)")

    def to_domain(self) -> domain.Rule:
        return domain.Rule(name=self.name, required_approvals=self.required_approvals,
                           conditions=self.conditions.to_domain(), approver_scopes=tuple(self.approver_scopes),
                           approver_principals=tuple(dict.fromkeys(self.approver_principals)))


class PolicyUpdate(_Strict):
    """A new version of the policy; requests already open keep theirs."""

    rules: Annotated[list[RuleSchema], Field(min_length=1, max_length=domain.MAX_RULES)] = Field(
        description="Ordered; the first rule whose conditions all hold decides. The last one has no conditions.")
    expire_after_seconds: int | None = Field(default=None, ge=domain.MIN_EXPIRY_S, le=domain.MAX_EXPIRY_S,
                                             strict=True, description="Null: the service's default")
    escalate_after_seconds: int | None = Field(default=None, ge=domain.MIN_EXPIRY_S, le=domain.MAX_EXPIRY_S,
                                               strict=True, description="Null: no escalation notice")
    reason: Reason = Field(description="Why the policy changes (kept in the audit trail)")
    expected_version: int | None = Field(default=None, ge=0, strict=True,
                                         description="Refuse with 409 unless this is still the current version")

    @model_validator(mode="after")
    def _total_and_satisfiable(self) -> PolicyUpdate:
        try:
            domain.validate_rules(self.domain_rules())
            domain.validate_timers(self.expire_after_seconds, self.escalate_after_seconds)
        except domain.InvalidPolicy as exc:
            raise ValueError(str(exc)) from None
        return self

    def domain_rules(self) -> list[domain.Rule]:
        try:
            return [rule.to_domain() for rule in self.rules]
        except domain.InvalidPolicy as exc:
            raise ValueError(str(exc)) from None


class PolicyPublic(BaseModel):
    id: uuid.UUID
    subject_type: str
    version: int = Field(description="0 is the built-in default of the design; changes start at 1")
    is_default: bool
    rules: list[RuleSchema]
    expire_after_seconds: int | None
    escalate_after_seconds: int | None
    created_by: str | None
    reason: str | None
    created_at: datetime | None

    @classmethod
    def of(cls, policy: domain.Policy) -> PolicyPublic:
        return cls(id=policy.id, subject_type=policy.subject_type, version=policy.version,
                   is_default=policy.is_default,
                   rules=[RuleSchema.model_validate(rule.to_document()) for rule in policy.rules],
                   expire_after_seconds=policy.expire_after_seconds,
                   escalate_after_seconds=policy.escalate_after_seconds, created_by=policy.created_by,
                   reason=policy.reason, created_at=policy.created_at)


# ── events ────────────────────────────────────────────────────────────────────────────


class PaymentCreatedPayload(BaseModel):
    """What approvals reads from payment.created.v1; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    payment_id: SubjectId
    amount: AmountMinor
    currency: CurrencyCode
    created_by: PrincipalName | None = None
    metadata: dict[str, Any] | None = None


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SubjectRef(_Event):
    approval_id: uuid.UUID
    subject_type: str
    subject_id: str
    payment_id: str | None = Field(description="The subject when subject_type is payment, else null")


class _Snapshot(_SubjectRef):
    amount: int | None
    currency: str | None
    metadata: dict[str, Any]
    maker: str
    requested_by: str
    policy_id: uuid.UUID
    policy_version: int
    rule: str
    required_approvals: int
    approver_scopes: list[str]
    approver_principals: list[str]
    expires_at: datetime | None
    escalate_at: datetime | None


class ApprovalRequestedV1(_Snapshot):
    """A request opened; it waits for `required_approvals` distinct approvals."""


class ApprovalGrantedV1(_Snapshot):
    """The subject may proceed. `auto`: granted by the policy (actor system:policy)."""

    approvers: list[str]
    auto: bool


class ApprovalDecidedV1(_SubjectRef):
    """One principal's decision, recorded before any outcome it causes."""

    decision_id: uuid.UUID
    principal: str
    decision: Literal["approve", "reject"]
    reason: str | None
    approvals: int
    required_approvals: int


class ApprovalRejectedV1(_SubjectRef):
    rejected_by: str
    reason: str


class ApprovalExpiredV1(_SubjectRef):
    """Not decided in time; payments treats it like a rejection."""

    approvers: list[str]
    required_approvals: int
    expires_at: datetime


class ApprovalEscalatedV1(_SubjectRef):
    """The notice before expiry, sent once while the request is still pending."""

    approvers: list[str]
    required_approvals: int
    expires_at: datetime | None


class ApprovalPolicyChangedV1(_Event):
    policy_id: uuid.UUID
    subject_type: str
    version: int
    previous_version: int
    changed_by: str
    rules: list[dict[str, Any]]
    expire_after_seconds: int | None
    escalate_after_seconds: int | None


EVENT_SCHEMAS: dict[str, type[BaseModel]] = {
    domain.REQUESTED: ApprovalRequestedV1,
    domain.DECIDED: ApprovalDecidedV1,
    domain.GRANTED: ApprovalGrantedV1,
    domain.REJECTED: ApprovalRejectedV1,
    domain.EXPIRED: ApprovalExpiredV1,
    domain.ESCALATED: ApprovalEscalatedV1,
    domain.POLICY_CHANGED: ApprovalPolicyChangedV1,
}
