"""HTTP API of the approvals service. Routes are thin: parse, authorise, call one use case,
map the result. Scopes: `approvals:read` to look, `approvals:decide` to decide,
`approvals:request` to file a generic request, `approvals:admin` to change a policy.

No SQL or business rule lives here, and no route may run without a verified internal
token (the kit's app factory enforces it for every router given to it).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Path as PathParam, Query, Request

from services.approvals import service
from services.approvals.domain import ApprovalStatus, Verdict
from services.approvals.schemas import (
    ApprovalCreate, ApprovalDetail, ApprovalList, ApprovalPublic, DecisionCreate, DecisionResult, PolicyPublic,
    PolicyUpdate,
)
from services.approvals.settings import Settings
from shared.api import SessionmakerDep
from shared.auth import InsufficientScope, Principal, require_scope
from shared.errors import problem_responses
from shared.idempotency import IdempotencyDep, IdempotencyKeyInFlight, IdempotencyKeyReused, InvalidIdempotencyKey
from shared.service_app import build_service_app
from shared.uow import run_in_transaction

MIGRATIONS = Path(__file__).parent / "migrations"

READ, DECIDE, REQUEST, ADMIN = "approvals:read", "approvals:decide", "approvals:request", "approvals:admin"
ReaderDep = Annotated[Principal, Depends(require_scope(READ))]
DeciderDep = Annotated[Principal, Depends(require_scope(DECIDE))]
RequesterDep = Annotated[Principal, Depends(require_scope(REQUEST))]
AdminDep = Annotated[Principal, Depends(require_scope(ADMIN))]
ApprovalIdPath = Annotated[str, PathParam(description="The approval request's id (a UUID)")]
SubjectTypePath = Annotated[str, PathParam(pattern=r"^[a-z][a-z0-9_]{0,62}$", description="e.g. payment, payee")]

_IDEMPOTENCY_ERRORS = (InvalidIdempotencyKey, IdempotencyKeyInFlight, IdempotencyKeyReused)


def _approval_id(value: str) -> uuid.UUID:
    """A malformed id names no request: 404, like an unknown one (as payments answers)."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise service.ApprovalNotFound("No such approval request.") from None


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _policy_cache(request: Request) -> service.PolicyCache:
    return request.app.state.policy_cache


SettingsDep = Annotated[Settings, Depends(_settings)]
PolicyCacheDep = Annotated[service.PolicyCache, Depends(_policy_cache)]

router = APIRouter(prefix="/v1/approvals", tags=["approvals"])


@router.get("", response_model=ApprovalList, responses=problem_responses(400, service.InvalidCursor, 401,
                                                                          InsufficientScope, 422))
async def list_approvals(
    principal: ReaderDep,
    sessionmaker: SessionmakerDep,
    status: Annotated[ApprovalStatus | None, Query(description="pending, granted, rejected or expired")] = None,
    subject_type: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_]{0,62}$")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
) -> ApprovalList:
    """The tenant's approval requests, newest first, with their decisions."""
    page = await run_in_transaction(sessionmaker, lambda uow: service.list_approvals(
        uow=uow, tenant_id=principal.tenant_id, status=status, subject_type=subject_type, cursor=cursor, limit=limit))
    return ApprovalList(data=[ApprovalPublic.of(r) for r in page.requests], next_cursor=page.next_cursor)


@router.post("", status_code=201, response_model=ApprovalPublic,
             responses=problem_responses(400, *_IDEMPOTENCY_ERRORS, 401, InsufficientScope,
                                         service.ApprovalRequestExists, 422, service.PolicyKeptChanging))
async def create_approval(
    body: ApprovalCreate, principal: RequesterDep, idem: IdempotencyDep, sessionmaker: SessionmakerDep,
    settings: SettingsDep, policies: PolicyCacheDep,
):
    """File a generic approval request (a new payee, a ledger adjustment, ...). The tenant's
    policy for `subject_type` decides at once: granted, or pending until decided."""
    return await idem.run(
        sessionmaker,
        lambda uow: service.request_approval(
            uow=uow, tenant_id=principal.tenant_id, principal=principal.principal, subject_type=body.subject_type,
            subject_id=body.subject_id, amount=body.amount, currency=body.currency, metadata=body.metadata,
            created_by=body.created_by, default_expire_after_s=settings.approval_expire_after_s,
            policies=policies),
        status_code=201,
        serialize=lambda request: ApprovalPublic.of(request).model_dump(mode="json"),
        headers=lambda request: {"Location": f"/v1/approvals/{request.id}"},
    )


@router.get("/{approval_id}", response_model=ApprovalDetail,
            responses=problem_responses(401, InsufficientScope, service.ApprovalNotFound))
async def get_approval(approval_id: ApprovalIdPath, principal: ReaderDep,
                       sessionmaker: SessionmakerDep) -> ApprovalDetail:
    """One approval request with its decisions and its complete history (every event it
    recorded: who, when, why, under which correlation id)."""
    approval = _approval_id(approval_id)
    found = await run_in_transaction(sessionmaker, lambda uow: service.get_approval(
        uow=uow, tenant_id=principal.tenant_id, approval_id=approval))
    return ApprovalDetail.of_history(found.request, found.history)


@router.post("/{approval_id}/decisions", status_code=201, response_model=DecisionResult,
             responses=problem_responses(400, *_IDEMPOTENCY_ERRORS, 401, InsufficientScope,
                                         service.MakerCannotDecide, service.NotAnEligibleApprover,
                                         service.ApprovalNotFound, service.ApprovalNotPending,
                                         service.ApprovalExpired, service.DuplicateDecision, 422))
async def decide(
    approval_id: ApprovalIdPath, body: DecisionCreate, principal: DeciderDep, idem: IdempotencyDep,
    sessionmaker: SessionmakerDep,
):
    """Approve or reject. The maker never decides (403 maker_cannot_decide); one principal
    counts once; any rejection rejects; the Nth distinct approval grants; after the
    outcome every decision is a 409."""
    approval = _approval_id(approval_id)
    return await idem.run(
        sessionmaker,
        lambda uow: service.decide(uow=uow, tenant_id=principal.tenant_id, approval_id=approval,
                                   principal=principal.principal, scopes=principal.scopes,
                                   verdict=Verdict(body.decision), reason=body.reason),
        status_code=201,
        serialize=lambda outcome: DecisionResult.of(outcome.decision, outcome.request).model_dump(mode="json"),
    )


@router.get("/policies/{subject_type}", response_model=PolicyPublic,
            responses=problem_responses(401, InsufficientScope, service.PolicyVersionNotFound, 422))
async def get_policy(
    subject_type: SubjectTypePath, principal: ReaderDep, sessionmaker: SessionmakerDep,
    version: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="A past version; default the current")] = None,
) -> PolicyPublic:
    """The tenant's policy for a subject type: the current version (version 0 is the
    built-in default of the design), or any past one."""
    policy = await run_in_transaction(sessionmaker, lambda uow: service.get_policy(
        uow=uow, tenant_id=principal.tenant_id, subject_type=subject_type, version=version))
    return PolicyPublic.of(policy)


@router.put("/policies/{subject_type}", response_model=PolicyPublic,
            responses=problem_responses(400, *_IDEMPOTENCY_ERRORS, 401, InsufficientScope,
                                        service.PolicyVersionConflict, 422))
async def change_policy(
    subject_type: SubjectTypePath, body: PolicyUpdate, principal: AdminDep, idem: IdempotencyDep,
    sessionmaker: SessionmakerDep,
):
    """Publish a new version of the policy (audited as approval_policy.changed). Requests
    already open keep the version they were opened with; new ones use this one."""
    return await idem.run(
        sessionmaker,
        lambda uow: service.change_policy(
            uow=uow, tenant_id=principal.tenant_id, subject_type=subject_type, changed_by=principal.principal,
            rules=body.domain_rules(), expire_after_seconds=body.expire_after_seconds,
            escalate_after_seconds=body.escalate_after_seconds, reason=body.reason,
            expected_version=body.expected_version),
        status_code=200,
        serialize=lambda policy: PolicyPublic.of(policy).model_dump(mode="json"),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    app = build_service_app(settings=settings or Settings(), routers=[router], migrations_dir=MIGRATIONS)
    app.state.policy_cache = service.PolicyCache()
    return app
