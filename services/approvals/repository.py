"""SQL of the approvals service: typed table models and the queries the use cases need.

Every query a caller can reach is scoped to one tenant; a row of another tenant is simply
not found. The only cross-tenant reads are the timer jobs' (`lock_overdue`,
`lock_escalation_due`), which act on each row under that row's own tenant. Rows here are
projections of the event log: this module writes them only from domain objects whose
events the unit of work writes in the same transaction, and never deletes anything.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import ARRAY, BigInteger, DateTime, Integer, Text, and_, or_, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.approvals.domain import (
    AGGREGATE, ApprovalRequest, ApprovalStatus, DecisionRecord, Policy, Rule, Verdict,
)


class Base(DeclarativeBase):
    pass


class PolicyRow(Base):
    __tablename__ = "approval_policies"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    subject_type: Mapped[str] = mapped_column(Text)
    current_version: Mapped[int] = mapped_column(Integer)


class PolicyVersionRow(Base):
    __tablename__ = "approval_policy_versions"

    policy_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    subject_type: Mapped[str] = mapped_column(Text)
    rules: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    expire_after_seconds: Mapped[int | None] = mapped_column(Integer)
    escalate_after_seconds: Mapped[int | None] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApprovalRequestRow(Base):
    __tablename__ = "approval_requests"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    subject_type: Mapped[str] = mapped_column(Text)
    subject_id: Mapped[str] = mapped_column(Text)
    amount: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(Text)
    subject_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB)
    maker: Mapped[str] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(Text)
    policy_id: Mapped[uuid.UUID]
    policy_version: Mapped[int] = mapped_column(Integer)
    rule: Mapped[str] = mapped_column(Text)
    required_approvals: Mapped[int] = mapped_column(Integer)
    approver_scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))
    approver_principals: Mapped[list[str]] = mapped_column(ARRAY(Text))
    status: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    escalate_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    escalated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    correlation_id: Mapped[str | None] = mapped_column(Text)


class DecisionRow(Base):
    __tablename__ = "approval_decisions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    request_id: Mapped[uuid.UUID]
    tenant_id: Mapped[str] = mapped_column(Text)
    principal: Mapped[str] = mapped_column(Text)
    decision: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    correlation_id: Mapped[str | None] = mapped_column(Text)
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# ── policies ─────────────────────────────────────────────────────────────────────────


def policy_from_row(row: PolicyVersionRow) -> Policy:
    return Policy(id=row.policy_id, tenant_id=row.tenant_id, subject_type=row.subject_type, version=row.version,
                  rules=tuple(Rule.from_document(r) for r in row.rules),
                  expire_after_seconds=row.expire_after_seconds, escalate_after_seconds=row.escalate_after_seconds,
                  created_by=row.created_by, reason=row.reason, created_at=row.created_at)


async def current_policy(session: AsyncSession, *, tenant_id: str, subject_type: str) -> Policy | None:
    """The tenant's current stored version, or None while the built-in default applies."""
    row = (await session.execute(
        select(PolicyVersionRow)
        .join(PolicyRow, and_(PolicyRow.id == PolicyVersionRow.policy_id,
                              PolicyRow.current_version == PolicyVersionRow.version))
        .where(PolicyRow.tenant_id == tenant_id, PolicyRow.subject_type == subject_type)
    )).scalar_one_or_none()
    return policy_from_row(row) if row else None


async def policy_version(session: AsyncSession, *, tenant_id: str, subject_type: str, version: int) -> Policy | None:
    row = (await session.execute(
        select(PolicyVersionRow).where(PolicyVersionRow.tenant_id == tenant_id,
                                       PolicyVersionRow.subject_type == subject_type,
                                       PolicyVersionRow.version == version)
    )).scalar_one_or_none()
    return policy_from_row(row) if row else None


async def lock_policy(session: AsyncSession, *, policy_id: uuid.UUID, tenant_id: str, subject_type: str) -> int:
    """Lock the policy's header row, creating it on first use, and return its current
    version (0: the built-in default). Writers of one policy queue here, so two changes
    can never both become version N+1."""
    await session.execute(
        insert(PolicyRow)
        .values(id=policy_id, tenant_id=tenant_id, subject_type=subject_type, current_version=0)
        .on_conflict_do_nothing()
    )
    return (await session.execute(
        select(PolicyRow.current_version)
        .where(PolicyRow.id == policy_id, PolicyRow.tenant_id == tenant_id, PolicyRow.subject_type == subject_type)
        .with_for_update()
    )).scalar_one()


async def add_policy_version(session: AsyncSession, *, policy: Policy) -> None:
    doc = policy.document()
    await session.execute(insert(PolicyVersionRow).values(
        policy_id=policy.id, version=policy.version, tenant_id=policy.tenant_id, subject_type=policy.subject_type,
        rules=doc["rules"], expire_after_seconds=policy.expire_after_seconds,
        escalate_after_seconds=policy.escalate_after_seconds, created_by=policy.created_by, reason=policy.reason,
        created_at=policy.created_at,
    ))
    await session.execute(
        update(PolicyRow).where(PolicyRow.id == policy.id).values(current_version=policy.version)
    )


# ── requests ─────────────────────────────────────────────────────────────────────────


def _request_values(request: ApprovalRequest) -> dict[str, Any]:
    return dict(
        id=request.id, tenant_id=request.tenant_id, subject_type=request.subject_type,
        subject_id=request.subject_id, amount=request.amount, currency=request.currency,
        subject_metadata=request.metadata, maker=request.maker, requested_by=request.requested_by,
        policy_id=request.policy_id, policy_version=request.policy_version, rule=request.rule,
        required_approvals=request.required_approvals, approver_scopes=list(request.approver_scopes),
        approver_principals=list(request.approver_principals), status=request.status.value,
        created_at=request.created_at, expires_at=request.expires_at, escalate_at=request.escalate_at,
        escalated_at=request.escalated_at, resolved_at=request.resolved_at, correlation_id=request.correlation_id,
    )


# One round trip for the hot path (payment.created): insert the request only if the policy
# version it was evaluated under is still the tenant's current one, and say which version
# is current either way. The caller evaluated against a cached version (versions never
# change once written); this statement is what makes that guess exact.
_OPEN_REQUEST = text(
    """
    WITH policy AS (
        SELECT coalesce((SELECT current_version FROM approval_policies
                         WHERE tenant_id = :tenant_id AND subject_type = :subject_type), 0) AS version
    ), opened AS (
        INSERT INTO approval_requests (
            id, tenant_id, subject_type, subject_id, amount, currency, metadata, maker, requested_by, policy_id,
            policy_version, rule, required_approvals, approver_scopes, approver_principals, status, created_at,
            expires_at, escalate_at, escalated_at, resolved_at, correlation_id)
        SELECT CAST(:id AS uuid), :tenant_id, :subject_type, :subject_id, CAST(:amount AS bigint), :currency,
               CAST(:metadata AS jsonb), :maker, :requested_by, CAST(:policy_id AS uuid), :policy_version, :rule,
               :required_approvals, CAST(:approver_scopes AS text[]), CAST(:approver_principals AS text[]), :status,
               CAST(:created_at AS timestamptz), CAST(:expires_at AS timestamptz),
               CAST(:escalate_at AS timestamptz), CAST(:escalated_at AS timestamptz),
               CAST(:resolved_at AS timestamptz), :correlation_id
        FROM policy WHERE policy.version = :policy_version
        ON CONFLICT (tenant_id, subject_type, subject_id) DO NOTHING
        RETURNING id
    )
    SELECT (SELECT version FROM policy) AS current_version, EXISTS (SELECT 1 FROM opened) AS opened
    """
)


@dataclass(frozen=True)
class OpenAttempt:
    opened: bool  # False: the subject already had a request, or the policy moved on
    current_version: int  # the tenant's current policy version (0: the built-in default)


async def open_request(session: AsyncSession, request: ApprovalRequest) -> OpenAttempt:
    values = _request_values(request)
    values["metadata"] = orjson.dumps(values.pop("subject_metadata")).decode()
    row = (await session.execute(_OPEN_REQUEST, values)).one()
    return OpenAttempt(opened=row.opened, current_version=row.current_version)


# The same for a run of payment.created messages: one statement for all of them. Each row
# is inserted only if the version it was evaluated under is its tenant's current one; the
# answer says, row by row, whether it was opened and which version is current.
_OPEN_REQUESTS = text(
    """
    WITH input AS (
        SELECT * FROM unnest(
            CAST(:ids AS uuid[]), CAST(:tenant_ids AS text[]), CAST(:subject_types AS text[]),
            CAST(:subject_ids AS text[]), CAST(:amounts AS bigint[]), CAST(:currencies AS text[]),
            CAST(:metadata AS jsonb[]), CAST(:makers AS text[]), CAST(:requested_bys AS text[]),
            CAST(:policy_ids AS uuid[]), CAST(:policy_versions AS int[]), CAST(:rules AS text[]),
            CAST(:required_approvals AS int[]), CAST(:approver_scopes AS jsonb[]),
            CAST(:approver_principals AS jsonb[]), CAST(:statuses AS text[]), CAST(:created_ats AS timestamptz[]),
            CAST(:expires_ats AS timestamptz[]), CAST(:escalate_ats AS timestamptz[]),
            CAST(:resolved_ats AS timestamptz[]), CAST(:correlation_ids AS text[])
        ) WITH ORDINALITY AS i(id, tenant_id, subject_type, subject_id, amount, currency, metadata, maker,
                               requested_by, policy_id, policy_version, rule, required_approvals, approver_scopes,
                               approver_principals, status, created_at, expires_at, escalate_at, resolved_at,
                               correlation_id, position)
    ), checked AS (
        SELECT i.*, coalesce(p.current_version, 0) AS current_version
        FROM input i LEFT JOIN approval_policies p ON p.tenant_id = i.tenant_id AND p.subject_type = i.subject_type
    ), opened AS (
        INSERT INTO approval_requests (
            id, tenant_id, subject_type, subject_id, amount, currency, metadata, maker, requested_by, policy_id,
            policy_version, rule, required_approvals, approver_scopes, approver_principals, status, created_at,
            expires_at, escalate_at, escalated_at, resolved_at, correlation_id)
        SELECT id, tenant_id, subject_type, subject_id, amount, currency, metadata, maker, requested_by, policy_id,
               policy_version, rule, required_approvals,
               ARRAY(SELECT jsonb_array_elements_text(approver_scopes)),
               ARRAY(SELECT jsonb_array_elements_text(approver_principals)), status, created_at, expires_at,
               escalate_at, NULL, resolved_at, correlation_id
        FROM checked WHERE current_version = policy_version
        ORDER BY position
        ON CONFLICT (tenant_id, subject_type, subject_id) DO NOTHING
        RETURNING id
    )
    SELECT c.current_version, o.id IS NOT NULL AS opened
    FROM checked c LEFT JOIN opened o ON o.id = c.id ORDER BY c.position
    """
)


async def open_requests(session: AsyncSession, requests: Sequence[ApprovalRequest]) -> list[OpenAttempt]:
    """`open_request` for many requests in one round trip; answers in the same order."""
    if not requests:
        return []
    dumps = orjson.dumps
    params = {
        "ids": [r.id for r in requests], "tenant_ids": [r.tenant_id for r in requests],
        "subject_types": [r.subject_type for r in requests], "subject_ids": [r.subject_id for r in requests],
        "amounts": [r.amount for r in requests], "currencies": [r.currency for r in requests],
        "metadata": [dumps(r.metadata).decode() for r in requests], "makers": [r.maker for r in requests],
        "requested_bys": [r.requested_by for r in requests], "policy_ids": [r.policy_id for r in requests],
        "policy_versions": [r.policy_version for r in requests], "rules": [r.rule for r in requests],
        "required_approvals": [r.required_approvals for r in requests],
        "approver_scopes": [dumps(list(r.approver_scopes)).decode() for r in requests],
        "approver_principals": [dumps(list(r.approver_principals)).decode() for r in requests],
        "statuses": [r.status.value for r in requests], "created_ats": [r.created_at for r in requests],
        "expires_ats": [r.expires_at for r in requests], "escalate_ats": [r.escalate_at for r in requests],
        "resolved_ats": [r.resolved_at for r in requests], "correlation_ids": [r.correlation_id for r in requests],
    }
    rows = (await session.execute(_OPEN_REQUESTS, params)).all()
    return [OpenAttempt(opened=row.opened, current_version=row.current_version) for row in rows]


async def request_id_for_subject(session: AsyncSession, *, tenant_id: str, subject_type: str,
                                 subject_id: str) -> uuid.UUID | None:
    return (await session.execute(
        select(ApprovalRequestRow.id).where(ApprovalRequestRow.tenant_id == tenant_id,
                                            ApprovalRequestRow.subject_type == subject_type,
                                            ApprovalRequestRow.subject_id == subject_id)
    )).scalar_one_or_none()


def _request_from_row(row: ApprovalRequestRow, decisions: list[DecisionRecord]) -> ApprovalRequest:
    return ApprovalRequest(
        id=row.id, tenant_id=row.tenant_id, subject_type=row.subject_type, subject_id=row.subject_id,
        amount=row.amount, currency=row.currency, metadata=dict(row.subject_metadata), maker=row.maker,
        requested_by=row.requested_by, policy_id=row.policy_id, policy_version=row.policy_version, rule=row.rule,
        required_approvals=row.required_approvals, approver_scopes=tuple(row.approver_scopes),
        approver_principals=tuple(row.approver_principals), status=ApprovalStatus(row.status),
        created_at=row.created_at, expires_at=row.expires_at, escalate_at=row.escalate_at,
        escalated_at=row.escalated_at, resolved_at=row.resolved_at, correlation_id=row.correlation_id,
        decisions=decisions,
    )


def _decision_from_row(row: DecisionRow) -> DecisionRecord:
    return DecisionRecord(id=row.id, principal=row.principal, verdict=Verdict(row.decision), reason=row.reason,
                          decided_at=row.decided_at, correlation_id=row.correlation_id)


async def _with_decisions(session: AsyncSession, rows: Sequence[ApprovalRequestRow]) -> list[ApprovalRequest]:
    if not rows:
        return []
    decided = (await session.execute(
        select(DecisionRow)
        .where(DecisionRow.request_id.in_([row.id for row in rows]),
               DecisionRow.tenant_id.in_(sorted({row.tenant_id for row in rows})))
        .order_by(DecisionRow.decided_at, DecisionRow.id)
    )).scalars()
    by_request: dict[uuid.UUID, list[DecisionRecord]] = {row.id: [] for row in rows}
    for decision in decided:
        by_request[decision.request_id].append(_decision_from_row(decision))
    return [_request_from_row(row, by_request[row.id]) for row in rows]


async def get_request(session: AsyncSession, *, tenant_id: str, approval_id: uuid.UUID,
                      for_update: bool = False) -> ApprovalRequest | None:
    """One request with its decisions. `for_update` locks the row: deciders of one request
    queue here, so exactly one of them can reach the outcome."""
    query = select(ApprovalRequestRow).where(ApprovalRequestRow.tenant_id == tenant_id,
                                             ApprovalRequestRow.id == approval_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).scalar_one_or_none()
    if row is None:
        return None
    return (await _with_decisions(session, [row]))[0]


@dataclass(frozen=True)
class PageCursor:
    created_at: datetime
    id: uuid.UUID


async def list_requests(session: AsyncSession, *, tenant_id: str, status: ApprovalStatus | None,
                        subject_type: str | None, after: PageCursor | None,
                        limit: int) -> tuple[list[ApprovalRequest], PageCursor | None]:
    """Newest first; keyset pagination on (created_at, id) so pages never skip or repeat."""
    query = select(ApprovalRequestRow).where(ApprovalRequestRow.tenant_id == tenant_id)
    if status is not None:
        query = query.where(ApprovalRequestRow.status == status.value)
    if subject_type is not None:
        query = query.where(ApprovalRequestRow.subject_type == subject_type)
    if after is not None:
        query = query.where(tuple_(ApprovalRequestRow.created_at, ApprovalRequestRow.id)
                            < tuple_(after.created_at, after.id))
    query = query.order_by(ApprovalRequestRow.created_at.desc(), ApprovalRequestRow.id.desc()).limit(limit + 1)
    rows = list((await session.execute(query)).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = PageCursor(rows[-1].created_at, rows[-1].id) if more else None
    return await _with_decisions(session, rows), next_cursor


async def add_decision(session: AsyncSession, *, request: ApprovalRequest, decision: DecisionRecord) -> None:
    await session.execute(insert(DecisionRow).values(
        id=decision.id, request_id=request.id, tenant_id=request.tenant_id, principal=decision.principal,
        decision=decision.verdict.value, reason=decision.reason, correlation_id=decision.correlation_id,
        decided_at=decision.decided_at,
    ))


async def save_progress(session: AsyncSession, request: ApprovalRequest) -> None:
    """Write the parts of a request that may change: its status and its timers."""
    await session.execute(
        update(ApprovalRequestRow)
        .where(ApprovalRequestRow.tenant_id == request.tenant_id, ApprovalRequestRow.id == request.id)
        .values(status=request.status.value, resolved_at=request.resolved_at, escalated_at=request.escalated_at)
    )


async def lock_overdue(session: AsyncSession, *, now: datetime, limit: int) -> list[ApprovalRequest]:
    """Pending requests past their deadline, across tenants, locked. SKIP LOCKED: a request
    a decider holds right now is left for the next round, and replicas of the job never
    wait for each other."""
    rows = list((await session.execute(
        select(ApprovalRequestRow)
        .where(ApprovalRequestRow.status == ApprovalStatus.PENDING.value, ApprovalRequestRow.expires_at <= now)
        .order_by(ApprovalRequestRow.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )).scalars())
    return await _with_decisions(session, rows)


async def lock_escalation_due(session: AsyncSession, *, now: datetime, limit: int) -> list[ApprovalRequest]:
    rows = list((await session.execute(
        select(ApprovalRequestRow)
        .where(ApprovalRequestRow.status == ApprovalStatus.PENDING.value,
               ApprovalRequestRow.escalated_at.is_(None), ApprovalRequestRow.escalate_at <= now,
               or_(ApprovalRequestRow.expires_at.is_(None), ApprovalRequestRow.expires_at > now))
        .order_by(ApprovalRequestRow.escalate_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )).scalars())
    return await _with_decisions(session, rows)


# ── history ──────────────────────────────────────────────────────────────────────────

_HISTORY = text(
    """
    SELECT type, occurred_at, actor, reason, correlation_id, payload
    FROM events
    WHERE tenant_id = :tenant_id AND aggregate_type = :aggregate_type AND aggregate_id = :aggregate_id
    ORDER BY seq
    """
)


async def history(session: AsyncSession, *, tenant_id: str, approval_id: uuid.UUID) -> list[dict[str, Any]]:
    """The request's audit trail: every event it recorded, oldest first."""
    rows = await session.execute(_HISTORY, {"tenant_id": tenant_id, "aggregate_type": AGGREGATE,
                                            "aggregate_id": str(approval_id)})
    return [dict(row._mapping) for row in rows]

