"""HTTP API of the ledger service. Routes are thin: parse, authorise, call one use case,
map the result. Every POST honours Idempotency-Key; every read is tenant-scoped by the
verified internal token (another tenant's object is a 404).

Paths and field names of ARCHITECTURE.md §6 are the contract and must not drift; this
module adds endpoints and fields, never renames them.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.exc import TimeoutError as PoolTimeout

from services.ledger import service
from services.ledger.domain import (
    AmountExceedsHold, BalanceLimitExceeded, CurrencyMismatch, DuplicateExternalId, Hold, HoldExpired, HoldNotPending,
    HoldOwnedByPayment, InsufficientFunds, NormalBalance, NotReversible, SameAccount, Transaction,
    UnbalancedTransaction,
)
from services.ledger.repository import AccountRow, BalanceSnapshot, EntryRow
from services.ledger.schemas import (
    AccountCreate, AccountList, AccountPublic, BalanceAfter, BalancePublic, BulkResult,
    BulkTransactionCreate, EntryList, EntryPublic, HoldCreate, HoldList, HoldPost, HoldPublic, HoldVoid,
    ReversalCreate, Rfc3339, TransactionCreate, TransactionEntryPublic, TransactionList, TransactionPublic,
)
from services.ledger.settings import Settings
from shared.api import SessionmakerDep
from shared.db import make_sessionmaker
from shared.auth import Principal, require_scope
from shared.errors import ServiceUnavailable, domain_error_response, problem_responses, unhandled_error_response
from shared.idempotency import IdempotencyDep, IdempotencyKeyInFlight, IdempotencyKeyReused, InvalidIdempotencyKey
from shared.money import CurrencyCode
from shared.service_app import build_service_app
from shared.uow import is_retryable

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)

def get_read_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    return request.app.state.read_sessionmaker


# Reads are single statements (or independent ones) over immutable rows or one balance
# row: they run on autocommit connections, one round trip each instead of three
# (BEGIN, query, ROLLBACK) — what keeps a balance `as_of` within a few milliseconds.
ReadSessionmakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_read_sessionmaker)]
Reader = Annotated[Principal, Depends(require_scope("ledger:read"))]
Writer = Annotated[Principal, Depends(require_scope("ledger:write"))]
Limit = Annotated[int, Query(ge=1, le=500, description="Page size")]
# Filters compared with stored text: no control characters (PostgreSQL refuses NUL).
_FILTER_TEXT = r"^[^\x00-\x1f\x7f]+$"
Cursor = Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")]

router = APIRouter(prefix="/v1/ledger", tags=["ledger"])

class DatabaseBusy(ServiceUnavailable):
    code = "database_busy"
    title = "Database busy"


# Problems every authenticated route may answer, besides its own.
_AUTH = (401, 403, 422, DatabaseBusy)
_WRITE = (*_AUTH, 400, 409, IdempotencyKeyReused, IdempotencyKeyInFlight, InvalidIdempotencyKey, 413)
_POSTING = (service.AccountNotFound, UnbalancedTransaction, InsufficientFunds, CurrencyMismatch, BalanceLimitExceeded,
            service.ExternalIdConflict)


# ── mapping ──────────────────────────────────────────────────────────────────────────


def account_public(row: AccountRow) -> AccountPublic:
    return AccountPublic(id=row.id, name=row.name, currency=row.currency, normal_balance=row.normal_balance,
                         allow_negative=row.allow_negative, kind="system" if row.system_code else "customer",
                         system_code=row.system_code, metadata=row.metadata_, created_at=row.created_at)


def balance_public(snapshot: BalanceSnapshot) -> BalancePublic:
    totals, normal = snapshot.totals, snapshot.normal_balance
    return BalancePublic(
        account_id=snapshot.account_id, currency=snapshot.currency, posted=totals.posted(normal),
        pending=totals.pending(normal), available=totals.available(normal), as_of=snapshot.as_of,
        normal_balance=normal.value, posted_debits=totals.posted_debits, posted_credits=totals.posted_credits,
        pending_debits=totals.pending_debits, pending_credits=totals.pending_credits, version=snapshot.version)


def entry_public(row: EntryRow, normal: NormalBalance) -> EntryPublic:
    totals = row.totals()
    return EntryPublic(
        transaction_id=row.transaction_id, index=row.entry_index, account_id=row.account_id,
        account_version=row.account_version, direction=row.direction, kind=row.kind, amount=row.amount,
        currency=row.currency, posted_at=row.posted_at,
        balance_after=BalanceAfter(posted=totals.posted(normal), pending=totals.pending(normal),
                                   available=totals.available(normal)))


def transaction_public(transaction: Transaction) -> TransactionPublic:
    return TransactionPublic(
        id=transaction.id, posted_at=transaction.posted_at, kind=transaction.kind.value,
        entries=[TransactionEntryPublic(index=e.index, account_id=e.account_id, direction=e.direction.value,
                                        amount=e.amount, currency=e.currency, kind=e.kind.value,
                                        account_version=e.account_version) for e in transaction.entries],
        description=transaction.description, external_id=transaction.external_id,
        metadata=dict(transaction.metadata), reverses_id=transaction.reverses_id, hold_id=transaction.hold_id,
        payment_id=transaction.payment_id, hash=transaction.hash.hex())


def hold_public(hold: Hold) -> HoldPublic:
    return HoldPublic(
        id=hold.id, status=hold.status.value, debit_account_id=hold.debit_account_id,
        credit_account_id=hold.credit_account_id, amount=hold.amount, amount_posted=hold.amount_posted,
        currency=hold.currency, payment_id=hold.payment_id, description=hold.description, expires_at=hold.expires_at,
        placed_transaction_id=hold.placed_transaction_id, resolved_transaction_id=hold.resolved_transaction_id,
        void_reason=hold.void_reason, created_at=hold.created_at, resolved_at=hold.resolved_at)


def _json(model) -> dict:
    return model.model_dump(mode="json")


# ── accounts ─────────────────────────────────────────────────────────────────────────


@router.post("/accounts", status_code=201, response_model=AccountPublic, responses=problem_responses(*_WRITE))
async def create_account(body: AccountCreate, principal: Writer, idem: IdempotencyDep,
                         sessionmaker: SessionmakerDep):
    """Open an account. The tenant's system accounts in that currency (`payouts_in_transit`,
    `funding`) are opened with it the first time."""
    return await idem.run(
        sessionmaker,
        lambda uow: service.create_account(uow=uow, tenant_id=principal.tenant_id, request=body),
        serialize=lambda row: _json(account_public(row)),
        headers=lambda row: {"Location": f"/v1/ledger/accounts/{row.id}"})


@router.get("/accounts", response_model=AccountList, responses=problem_responses(*_AUTH, 400))
async def list_accounts(principal: Reader, sessionmaker: ReadSessionmakerDep, limit: Limit = 50, cursor: Cursor = None,
                        currency: Annotated[CurrencyCode | None, Query()] = None,
                        kind: Annotated[Literal["customer", "system"] | None, Query()] = None) -> AccountList:
    rows, next_cursor = await service.list_accounts(sessionmaker=sessionmaker, tenant_id=principal.tenant_id,
                                                    limit=limit, cursor=cursor, currency=currency, kind=kind)
    return AccountList(data=[account_public(r) for r in rows], next_cursor=next_cursor)


@router.get("/accounts/{account_id}", response_model=AccountPublic,
            responses=problem_responses(*_AUTH, service.AccountNotFound))
async def get_account(account_id: uuid.UUID, principal: Reader, sessionmaker: ReadSessionmakerDep) -> AccountPublic:
    return account_public(await service.get_account(sessionmaker=sessionmaker, tenant_id=principal.tenant_id,
                                                    account_id=account_id))


@router.get("/accounts/{account_id}/balance", response_model=BalancePublic,
            responses=problem_responses(*_AUTH, service.AccountNotFound))
async def get_balance(account_id: uuid.UUID, principal: Reader, sessionmaker: ReadSessionmakerDep,
                      as_of: Annotated[Rfc3339 | None, Query(description="RFC 3339 instant; now by default")] = None,
                      ) -> BalancePublic:
    """Posted, pending and available balance now or at any past instant (pending holds
    included as they stood then)."""
    snapshot = await service.get_balance(sessionmaker=sessionmaker, tenant_id=principal.tenant_id,
                                         account_id=account_id, as_of=as_of)
    return balance_public(snapshot)


@router.get("/accounts/{account_id}/entries", response_model=EntryList,
            responses=problem_responses(*_AUTH, 400, service.AccountNotFound, service.InvalidCursor))
async def list_entries(account_id: uuid.UUID, principal: Reader, sessionmaker: ReadSessionmakerDep, limit: Limit = 50,
                       cursor: Cursor = None,
                       order: Annotated[Literal["asc", "desc"], Query(description="By account version")] = "asc",
                       ) -> EntryList:
    """The account's entries with the balance right after each, oldest first by default."""
    page = await service.list_entries(sessionmaker=sessionmaker, tenant_id=principal.tenant_id,
                                      account_id=account_id, limit=limit, cursor=cursor, newest_first=order == "desc")
    return EntryList(data=[entry_public(r, page.normal_balance) for r in page.entries], next_cursor=page.next_cursor)


# ── transactions ─────────────────────────────────────────────────────────────────────


@router.post("/transactions", status_code=201, response_model=TransactionPublic,
             responses=problem_responses(*_WRITE, *_POSTING))
async def post_transaction(body: TransactionCreate, principal: Writer, idem: IdempotencyDep,
                           sessionmaker: SessionmakerDep):
    """Post a balanced transaction atomically. Unbalanced (per currency) → 422
    `unbalanced_transaction`; a non-negative account going below zero → 422 `insufficient_funds`."""
    return await idem.run(
        sessionmaker,
        lambda uow: service.post_transaction(uow=uow, tenant_id=principal.tenant_id, request=body),
        serialize=lambda t: _json(transaction_public(t)),
        headers=lambda t: {"Location": f"/v1/ledger/transactions/{t.id}"})


@router.post("/transactions/bulk", status_code=201, response_model=BulkResult,
             responses={**problem_responses(*_WRITE, *_POSTING, DuplicateExternalId),
                        200: {"model": BulkResult, "description": "Not atomic: what was posted and what was refused"}})
async def post_transactions_bulk(body: BulkTransactionCreate, principal: Writer, idem: IdempotencyDep,
                                 sessionmaker: SessionmakerDep):
    """Post up to 1,000 transactions in one request, all or nothing (201) by default; with
    `atomic: false` each is posted or refused on its own (200, one result per item)."""

    def result(outcomes: list[service.Outcome]) -> dict:
        # Plain dicts in the BulkResult shape: a thousand pydantic models per answer cost
        # more than posting the transactions. orjson writes the ids and times.
        items = [{"index": o.index, "status": "posted", "transaction_id": o.transaction.id,
                  "posted_at": o.transaction.posted_at, "problem": None}
                 if o.transaction else
                 {"index": o.index, "status": "refused", "transaction_id": None, "posted_at": None,
                  "problem": service.refusal_problem(o.refusal)}
                 for o in outcomes]
        posted = sum(1 for o in outcomes if o.transaction)
        return {"data": items, "posted": posted, "refused": len(outcomes) - posted}

    return await idem.run(
        sessionmaker,
        lambda uow: service.post_transactions(uow=uow, tenant_id=principal.tenant_id, requests=body.transactions,
                                              atomic=body.atomic),
        status_code=201 if body.atomic else 200, serialize=result)


@router.get("/transactions", response_model=TransactionList, responses=problem_responses(*_AUTH, 400))
async def list_transactions(principal: Reader, sessionmaker: ReadSessionmakerDep, limit: Limit = 50,
                            cursor: Cursor = None,
                            external_id: Annotated[str | None, Query(max_length=255, pattern=_FILTER_TEXT)] = None,
                            ) -> TransactionList:
    found, next_cursor = await service.list_transactions(
        sessionmaker=sessionmaker, tenant_id=principal.tenant_id, external_id=external_id, limit=limit, cursor=cursor)
    return TransactionList(data=[transaction_public(t) for t in found], next_cursor=next_cursor)


@router.get("/transactions/{transaction_id}", response_model=TransactionPublic,
            responses=problem_responses(*_AUTH, service.TransactionNotFound))
async def get_transaction(transaction_id: uuid.UUID, principal: Reader,
                          sessionmaker: ReadSessionmakerDep) -> TransactionPublic:
    return transaction_public(await service.get_transaction(sessionmaker=sessionmaker, tenant_id=principal.tenant_id,
                                                            transaction_id=transaction_id))


@router.post("/transactions/{transaction_id}/reverse", status_code=201, response_model=TransactionPublic,
             responses=problem_responses(*_WRITE, *_POSTING, service.TransactionNotFound, service.AlreadyReversed,
                                         NotReversible))
async def reverse_transaction(transaction_id: uuid.UUID, principal: Writer, idem: IdempotencyDep,
                              sessionmaker: SessionmakerDep, body: ReversalCreate | None = None):
    """Correct a transaction with a new one that mirrors its posted entries and points at
    it (`reverses_id`). Posted transactions are never edited; each is reversed at most once."""
    request = body or ReversalCreate()
    return await idem.run(
        sessionmaker,
        lambda uow: service.reverse_transaction(uow=uow, tenant_id=principal.tenant_id,
                                                transaction_id=transaction_id, request=request),
        serialize=lambda t: _json(transaction_public(t)),
        headers=lambda t: {"Location": f"/v1/ledger/transactions/{t.id}"})


# ── holds ────────────────────────────────────────────────────────────────────────────


@router.post("/holds", status_code=201, response_model=HoldPublic,
             responses=problem_responses(*_WRITE, service.AccountNotFound, InsufficientFunds, CurrencyMismatch,
                                         BalanceLimitExceeded, SameAccount, service.InvalidExpiry))
async def place_hold(body: HoldCreate, principal: Writer, idem: IdempotencyDep, sessionmaker: SessionmakerDep):
    """Reserve `amount` on `debit_account_id` for `credit_account_id` (pending entries):
    the debit account's available balance drops at once, its posted balance when posted."""
    return await idem.run(
        sessionmaker,
        lambda uow: service.place_hold(uow=uow, tenant_id=principal.tenant_id, request=body),
        serialize=lambda h: _json(hold_public(h)),
        headers=lambda h: {"Location": f"/v1/ledger/holds/{h.id}"})


@router.get("/holds", response_model=HoldList, responses=problem_responses(*_AUTH, 400))
async def list_holds(principal: Reader, sessionmaker: ReadSessionmakerDep, limit: Limit = 50, cursor: Cursor = None,
                     status: Annotated[Literal["pending", "posted", "voided", "expired"] | None, Query()] = None,
                     account_id: Annotated[uuid.UUID | None, Query(description="The debited account")] = None,
                     payment_id: Annotated[str | None, Query(max_length=128, pattern=_FILTER_TEXT)] = None,
                     ) -> HoldList:
    holds, next_cursor = await service.list_holds(
        sessionmaker=sessionmaker, tenant_id=principal.tenant_id, limit=limit, cursor=cursor, status=status,
        account_id=account_id, payment_id=payment_id)
    return HoldList(data=[hold_public(h) for h in holds], next_cursor=next_cursor)


@router.get("/holds/{hold_id}", response_model=HoldPublic, responses=problem_responses(*_AUTH, service.HoldNotFound))
async def get_hold(hold_id: uuid.UUID, principal: Reader, sessionmaker: ReadSessionmakerDep) -> HoldPublic:
    return hold_public(await service.get_hold(sessionmaker=sessionmaker, tenant_id=principal.tenant_id,
                                              hold_id=hold_id))


@router.post("/holds/{hold_id}/post", status_code=200, response_model=HoldPublic,
             responses=problem_responses(*_WRITE, service.HoldNotFound, HoldNotPending, HoldExpired,
                                         HoldOwnedByPayment, AmountExceedsHold, BalanceLimitExceeded))
async def post_hold(hold_id: uuid.UUID, principal: Writer, idem: IdempotencyDep, sessionmaker: SessionmakerDep,
                    body: Annotated[HoldPost | None, Body()] = None):
    """Post the hold, fully or `amount` of it; the rest is released."""
    amount = body.amount if body else None
    return await idem.run(
        sessionmaker,
        lambda uow: service.post_hold(uow=uow, tenant_id=principal.tenant_id, hold_id=hold_id, amount=amount),
        status_code=200, serialize=lambda h: _json(hold_public(h)))


@router.post("/holds/{hold_id}/void", status_code=200, response_model=HoldPublic,
             responses=problem_responses(*_WRITE, service.HoldNotFound, HoldNotPending, HoldOwnedByPayment))
async def void_hold(hold_id: uuid.UUID, principal: Writer, idem: IdempotencyDep, sessionmaker: SessionmakerDep,
                    body: Annotated[HoldVoid | None, Body()] = None):
    """Release the whole hold; nothing is posted."""
    reason = body.reason if body else None
    return await idem.run(
        sessionmaker,
        lambda uow: service.void_hold(uow=uow, tenant_id=principal.tenant_id, hold_id=hold_id, reason=reason),
        status_code=200, serialize=lambda h: _json(hold_public(h)))


# ── the app ──────────────────────────────────────────────────────────────────────────


def _is_unavailable(exc: BaseException) -> bool:
    """The database is saturated or away: a retry later can succeed. Never the input's fault."""
    if isinstance(exc, (PoolTimeout, OSError)):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or is_retryable(exc):
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(getattr(exc.orig, "__cause__", None),
                                                                  "sqlstate", None) or ""
        return sqlstate.startswith(("08", "53", "57P"))
    return False


def install_unavailable_handlers(app: FastAPI) -> None:
    """503 with Retry-After, not 500, when the pool is exhausted, the server is away or a
    deadlock/serialization failure outlived the unit of work's retries."""

    async def on_database_error(request: Request, exc: Exception):
        if _is_unavailable(exc):
            log.warning("database unavailable answering %s %s: %s", request.method, request.url.path,
                        type(exc).__name__)
            return domain_error_response(DatabaseBusy("The ledger is busy; retry shortly.",
                                                      headers={"Retry-After": "1"}))
        return unhandled_error_response(exc, method=request.method, path=request.url.path)

    for exc_type in (PoolTimeout, DBAPIError, OSError):
        app.add_exception_handler(exc_type, on_database_error)


def create_app(settings: Settings | None = None) -> FastAPI:
    app = build_service_app(settings=settings or Settings(), routers=[router], migrations_dir=MIGRATIONS)
    app.state.read_sessionmaker = make_sessionmaker(app.state.engine.execution_options(isolation_level="AUTOCOMMIT"))
    install_unavailable_handlers(app)
    return app
