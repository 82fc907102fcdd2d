"""HTTP API of the reconciliation service. Routes are thin: parse, authorise, call one use
case, map the result.

    POST /v1/reconciliation/statements           reconciliation:write  201 new | 200 same file again
    GET  /v1/reconciliation/statements/{id}      reconciliation:read
    POST /v1/reconciliation/runs                 reconciliation:write  202 queued (Idempotency-Key)
    GET  /v1/reconciliation/runs?status&limit&cursor   reconciliation:read  newest first
    GET  /v1/reconciliation/runs/{id}            reconciliation:read   status and progress
    GET  /v1/reconciliation/breaks?run_id&statement_id&status&type&limit&cursor   reconciliation:read
    GET  /v1/reconciliation/breaks/{id}          reconciliation:read
    POST /v1/reconciliation/breaks/{id}/resolve  reconciliation:write  (Idempotency-Key)
    GET  /v1/reconciliation/rules                reconciliation:read
    PUT  /v1/reconciliation/rules                reconciliation:write  (Idempotency-Key)

A statement upload is the file itself (text/csv, application/xml for camt.053, text/plain
for MT940), streamed to a temporary file while its sha256 is computed; it is never held
in memory whole. Every route needs the gateway's internal token and every query is
scoped to its tenant: another tenant's statement, run or break is a 404.
"""

from __future__ import annotations

import hashlib
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.middleware import Middleware

from services.reconciliation import service
from services.reconciliation.domain import (
    BreakAlreadyResolved, BreakNotFound, ManualMatchRefused, ReconciliationError, RunNotFound, StatementNotFound,
)
from services.reconciliation.schemas import (
    BreakFilters, BreakList, BreakPublic, BreakResolution, BreakResolve, RulesEnvelope, RulesPublic, RunCreate,
    RunFilters, RunList, RunPublic, StatementPublic,
)
from services.reconciliation.settings import Settings
from services.reconciliation.statements import FORMATS, format_for
from shared.api import BodyLimitMiddleware, SessionmakerDep
from shared.auth import Principal, require_scope
from shared.errors import PayloadTooLarge, UnsupportedMediaType, ValidationFailed, problem_responses
from shared.idempotency import (
    KEY_HEADER, Idempotency, IdempotencyDep, IdempotencyKeyInFlight, IdempotencyKeyReused, IdempotencyScope,
    InvalidIdempotencyKey, parse_key,
)
from shared.service_app import build_service_app
from shared.uow import run_in_transaction

MIGRATIONS = Path(__file__).parent / "migrations"
STATEMENTS_PATH = "/v1/reconciliation/statements"
SPOOL_IN_MEMORY = 1024 * 1024  # small uploads never touch the disk

Reader = Annotated[Principal, Depends(require_scope("reconciliation:read"))]
Writer = Annotated[Principal, Depends(require_scope("reconciliation:write"))]

router = APIRouter(prefix="/v1/reconciliation", tags=["reconciliation"])

_AUTH = (401, 403)
_WRITE = (*_AUTH, InvalidIdempotencyKey, IdempotencyKeyInFlight, IdempotencyKeyReused)


class EmptyStatement(ValidationFailed):
    code = "empty_statement"
    title = "Empty statement"


def _settings(request: Request) -> Settings:
    return request.app.state.settings


# ── statements ───────────────────────────────────────────────────────────────────────


@router.post(
    "/statements", status_code=201, response_model=StatementPublic,
    summary="Upload a statement (CSV, camt.053 or MT940): the body is the file",
    responses={200: {"description": "This exact file was uploaded before: its statement", "model": StatementPublic},
               **problem_responses(400, 413, 415, 422, *_WRITE, service.StatementInvalid, EmptyStatement)},
    openapi_extra={"requestBody": {"required": True, "content": {
        "text/csv": {"schema": {"type": "string"}}, "application/xml": {"schema": {"type": "string"}},
        "text/plain": {"schema": {"type": "string"}}}}},
)
async def upload_statement(request: Request, principal: Writer, sessionmaker: SessionmakerDep) -> Response:
    fmt = format_for(request.headers.get("content-type"))
    if fmt is None:
        raise UnsupportedMediaType(
            "A statement is sent as text/csv, application/xml (camt.053) or text/plain (MT940).",
            accepted=["text/csv", "application/xml", "text/plain"], formats=list(FORMATS))
    key = parse_key(request.headers.getlist(KEY_HEADER))
    limit = _settings(request).statement_max_bytes
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        upload = await _spool(request, spool, limit=limit)
        received_on = datetime.now(timezone.utc).date()
        async with sessionmaker() as session, session.begin():
            # Fast path for a re-sent file: no parsing, the first statement. With an
            # Idempotency-Key the key decides first (a retry replays its stored answer).
            existing = None if key is not None else await service.statement_by_hash(
                session=session, tenant_id=principal.tenant_id, sha256=upload.sha256)
            if existing is None:
                await service.prepare_statement_storage(session=session, received_on=received_on)
        if existing is not None:
            return _statement_response(existing, duplicate=True)

        async def use_case(uow) -> StatementPublic:
            statement = await service.import_statement(uow=uow, tenant_id=principal.tenant_id,
                                                       created_by=principal.principal, fmt=fmt, upload=upload,
                                                       received_on=received_on)
            return StatementPublic.of(statement)

        try:
            if key is None:
                statement = await run_in_transaction(sessionmaker, use_case)
                return _statement_response(statement, status=201)
            # The kit's IdempotencyDep would read the whole body to fingerprint it; the
            # sha256 computed while spooling is that same fingerprint (raw bytes).
            idem = Idempotency(key=key, fingerprint=upload.sha256.hex(), service_name=request.app.state.service_name,
                               scope=IdempotencyScope(tenant_id=principal.tenant_id, principal=principal.principal,
                                                      method=request.method, path=request.url.path))
            return await idem.run(sessionmaker, use_case, status_code=201, headers=_location)
        except (service.DuplicateStatement, IntegrityError) as exc:
            # Uploaded meanwhile (by this request's twin): that statement is the answer.
            if isinstance(exc, IntegrityError) and "content_sha256" not in str(exc.orig):
                raise
            async with sessionmaker() as session:
                existing = await service.statement_by_hash(session=session, tenant_id=principal.tenant_id,
                                                           sha256=upload.sha256)
            if existing is None:
                raise
            return _statement_response(existing, duplicate=True)


async def _spool(request: Request, spool, *, limit: int) -> service.Upload:
    digest, size = hashlib.sha256(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # the body-limit middleware stops it first; this is the backstop
            raise PayloadTooLarge(f"The statement is larger than the {limit} bytes this endpoint accepts.")
        digest.update(chunk)
        spool.write(chunk)
    if size == 0:
        raise EmptyStatement("The request body is empty; it must be the statement file.")
    return service.Upload(file=spool, sha256=digest.digest(), size=size)


def _location(statement: StatementPublic) -> dict[str, str]:
    return {"Location": f"{STATEMENTS_PATH}/{statement.id}"}


def _statement_response(statement, *, duplicate: bool = False, status: int | None = None) -> JSONResponse:
    body = statement if isinstance(statement, StatementPublic) else StatementPublic.of(statement, duplicate=duplicate)
    return JSONResponse(body.model_dump(mode="json"), status_code=status or (200 if duplicate else 201),
                        headers=_location(body))


@router.get("/statements/{statement_id}", response_model=StatementPublic, summary="Get a statement",
            responses=problem_responses(*_AUTH, StatementNotFound))
async def get_statement(statement_id: str, principal: Reader, sessionmaker: SessionmakerDep) -> StatementPublic:
    async with sessionmaker() as session:
        found = await service.get_statement(session=session, tenant_id=principal.tenant_id, statement_id=statement_id)
    return StatementPublic.of(found)


# ── runs ─────────────────────────────────────────────────────────────────────────────


@router.post("/runs", status_code=202, response_model=RunPublic, summary="Reconcile a statement (asynchronous)",
             responses=problem_responses(400, 422, *_WRITE, StatementNotFound, ReconciliationError))
async def create_run(body: RunCreate, principal: Writer, idem: IdempotencyDep,
                     sessionmaker: SessionmakerDep) -> Response:
    async def use_case(uow) -> RunPublic:
        run = await service.request_run(uow=uow, tenant_id=principal.tenant_id, requested_by=principal.principal,
                                        statement_id=body.statement_id)
        return RunPublic.of(run)

    return await idem.run(sessionmaker, use_case, status_code=202,
                          headers=lambda run: {"Location": f"/v1/reconciliation/runs/{run.id}"})


@router.get("/runs", response_model=RunList, summary="Runs, newest first, with their progress",
            responses=problem_responses(400, 422, *_AUTH, service.InvalidCursor))
async def list_runs(filters: Annotated[RunFilters, Query()], principal: Reader,
                    sessionmaker: SessionmakerDep) -> RunList:
    async with sessionmaker() as session:
        page, next_cursor = await service.list_runs(session=session, tenant_id=principal.tenant_id,
                                                    status=filters.status, cursor=filters.cursor,
                                                    limit=filters.limit)
    return RunList(data=[RunPublic.of(row) for row in page], next_cursor=next_cursor)


@router.get("/runs/{run_id}", response_model=RunPublic, summary="A run's status and progress",
            responses=problem_responses(*_AUTH, RunNotFound))
async def get_run(run_id: str, principal: Reader, sessionmaker: SessionmakerDep) -> RunPublic:
    async with sessionmaker() as session:
        return RunPublic.of(await service.get_run(session=session, tenant_id=principal.tenant_id, run_id=run_id))


# ── breaks ───────────────────────────────────────────────────────────────────────────


@router.get("/breaks", response_model=BreakList, summary="Breaks, oldest first",
            responses=problem_responses(400, 422, *_AUTH, service.InvalidCursor))
async def list_breaks(filters: Annotated[BreakFilters, Query()], principal: Reader,
                      sessionmaker: SessionmakerDep) -> BreakList:
    async with sessionmaker() as session:
        page, next_cursor = await service.list_breaks(session=session, tenant_id=principal.tenant_id,
                                                      filters=filters)
    now = datetime.now(timezone.utc)
    return BreakList(data=[service.break_public(row, now=now) for row in page], next_cursor=next_cursor)


@router.get("/breaks/{break_id}", response_model=BreakPublic, summary="Get a break",
            responses=problem_responses(*_AUTH, BreakNotFound))
async def get_break(break_id: str, principal: Reader, sessionmaker: SessionmakerDep) -> BreakPublic:
    async with sessionmaker() as session:
        found = await service.get_break(session=session, tenant_id=principal.tenant_id, break_id=break_id)
    return service.break_public(found)


@router.post("/breaks/{break_id}/resolve", response_model=BreakResolution, status_code=200,
             summary="Resolve a break with a reason (or a manual match); audited with the principal",
             responses=problem_responses(400, 422, *_WRITE, BreakNotFound, BreakAlreadyResolved, ManualMatchRefused,
                                         ReconciliationError))
async def resolve_break(break_id: str, body: BreakResolve, principal: Writer, idem: IdempotencyDep,
                        sessionmaker: SessionmakerDep) -> Response:
    async def use_case(uow) -> BreakResolution:
        resolved = await service.resolve_break(uow=uow, tenant_id=principal.tenant_id,
                                               principal=principal.principal, break_id=break_id, request=body)
        return BreakResolution(resolved=[service.break_public(row) for row in resolved])

    return await idem.run(sessionmaker, use_case, status_code=200)


# ── rules ────────────────────────────────────────────────────────────────────────────


@router.get("/rules", response_model=RulesEnvelope, summary="The tenant's matching rules",
            responses=problem_responses(*_AUTH))
async def get_rules(principal: Reader, sessionmaker: SessionmakerDep) -> RulesEnvelope:
    async with sessionmaker() as session:
        rules, version = await service.get_rules(session=session, tenant_id=principal.tenant_id)
    return RulesEnvelope(rules=RulesPublic(**rules.as_dict()), version=version)


@router.put("/rules", response_model=RulesEnvelope, summary="Replace the tenant's matching rules",
            responses=problem_responses(400, 422, *_WRITE))
async def put_rules(body: RulesPublic, principal: Writer, idem: IdempotencyDep,
                    sessionmaker: SessionmakerDep) -> Response:
    async def use_case(uow) -> RulesEnvelope:
        rules, version = await service.put_rules(uow=uow, tenant_id=principal.tenant_id,
                                                 updated_by=principal.principal, rules=body)
        return RulesEnvelope(rules=RulesPublic(**rules.as_dict()), version=version)

    return await idem.run(sessionmaker, use_case, status_code=200)


# ── the app ──────────────────────────────────────────────────────────────────────────


class RouteBodyLimit:
    """The kit's body limit, per route: statement uploads may be large (they stream to
    disk), every JSON body keeps the small limit."""

    def __init__(self, app, *, max_body_bytes: int, large_paths: dict[str, int]) -> None:
        self.default = BodyLimitMiddleware(app, max_body_bytes=max_body_bytes)
        self.large = {path: BodyLimitMiddleware(app, max_body_bytes=limit) for path, limit in large_paths.items()}

    async def __call__(self, scope, receive, send) -> None:
        limiter = self.large.get(scope.get("path", "").rstrip("/")) if scope["type"] == "http" else None
        await (limiter or self.default)(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = build_service_app(settings=settings, routers=[router], migrations_dir=MIGRATIONS)
    # The kit's factory installs one body limit for the whole app (1 MiB) and offers no
    # per-route setting: swap it for the per-route one before the middleware stack is built.
    app.user_middleware = [
        Middleware(RouteBodyLimit, max_body_bytes=settings.json_max_bytes,
                   large_paths={STATEMENTS_PATH: settings.statement_max_bytes})
        if entry.cls is BodyLimitMiddleware else entry
        for entry in app.user_middleware
    ]
    return app
