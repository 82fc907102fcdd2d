"""Use cases of the ledger: open accounts, post transactions (one or in bulk), reverse
them, place/post/void/expire holds, read balances at any instant, and react to the
payment flow (reserve, settle, close).

Every writer follows the same steps, in one unit of work owned by the caller:

    lock  (payment advisory lock) → (hold row) → balance rows in account-id order
    decide  domain.Book checks and computes entries, running balances and hashes
    write   one statement appends the journal and moves the balances; events to the log

Use cases never commit, never catch a database error they cannot name, and refuse with
`DomainError`s (status + stable code). Business refusals of the payment flow are events
(`ledger.hold.rejected.v1`), never exceptions.
"""

from __future__ import annotations

import base64
import collections
import binascii
import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import Counter
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.ledger import repository
from services.ledger.domain import (
    Book, CurrencyMismatch, Direction, DuplicateExternalId, EntryKind, Hold, HoldOwnedByPayment, HoldStatus,
    InsufficientFunds, Leg,
    NormalBalance, Transaction, TransactionKind, account_opened_event, genesis_hash, hold_rejected_event,
    hold_skipped_event, reversal_legs, transaction_posted_event,
)
from services.ledger.schemas import (
    AccountCreate, HoldCreate, PaymentApproved, PaymentClosed, PaymentRefunded, PaymentSettled, ReversalCreate,
    TransactionCreate,
)
from shared.errors import BadRequest, Conflict, DomainError, NotFound, ValidationFailed, problem_body
from shared.money import CURRENCY_EXPONENTS
from shared.uow import UnitOfWork

log = logging.getLogger(__name__)

# Postings per second on the dashboards, by TransactionKind.
TRANSACTIONS_POSTED = Counter("clearhouse_ledger_transactions_posted_total",
                              "Journal transactions committed, by kind", ["kind"])

SYSTEM_ACCOUNTS = {
    # code: (normal balance, why it exists)
    "payouts_in_transit": ("credit", "money reserved or paid out for payments, until the bank confirms it left"),
    "funding": ("debit", "where customer money comes from (the tenant's cash at the bank)"),
}


# ── errors of the use cases (the domain's own are in domain.py) ──────────────────────


class AccountNotFound(NotFound):
    code = "account_not_found"
    title = "Account not found"


class TransactionNotFound(NotFound):
    code = "transaction_not_found"
    title = "Transaction not found"


class HoldNotFound(NotFound):
    code = "hold_not_found"
    title = "Hold not found"


class ExternalIdConflict(Conflict):
    code = "external_id_conflict"
    title = "external_id already used"


class AlreadyReversed(Conflict):
    code = "transaction_already_reversed"
    title = "Transaction already reversed"


class InvalidExpiry(ValidationFailed):
    code = "invalid_expiry"
    title = "Invalid expiry"


class InvalidCursor(BadRequest):
    code = "invalid_cursor"
    title = "Invalid cursor"


class PaymentContractViolation(Exception):
    """A payment event the ledger cannot apply without inventing money (e.g. a settlement
    above the reserved amount). Not a business refusal: the consumer retries it and parks
    it in the DLQ, where a person looks at it."""


def new_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): time-ordered, so journal inserts append to the right edge of
    their indexes instead of dirtying random pages, and ids sort by creation."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = ((millis & (2**48 - 1)) << 80) | (0x7 << 76) | (((rand >> 62) & 0xFFF) << 64) | (0b10 << 62) \
        | (rand & (2**62 - 1))
    return uuid.UUID(int=value)


# ── cursors ──────────────────────────────────────────────────────────────────────────


_VERSION = re.compile(r"[0-9]{1,18}")


def encode_cursor(kind: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str | None) -> str | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    prefix, _, value = raw.partition(":")
    if prefix != kind or not value:
        raise InvalidCursor("The cursor is not one this list returned.")
    return value


def _uuid_cursor(kind: str, cursor: str | None) -> uuid.UUID | None:
    value = decode_cursor(kind, cursor)
    try:
        return uuid.UUID(value) if value is not None else None
    except ValueError:
        raise InvalidCursor("The cursor is not one this list returned.") from None


# ── accounts ─────────────────────────────────────────────────────────────────────────


def _new_account(*, tenant_id: str, name: str, currency: str, normal_balance: str, allow_negative: bool,
                 system_code: str | None, metadata: dict[str, str]) -> repository.NewAccount:
    account_id = new_id()
    return repository.NewAccount(
        id=account_id, tenant_id=tenant_id, name=name, currency=currency, normal_balance=normal_balance,
        allow_negative=allow_negative, system_code=system_code, metadata=metadata,
        genesis_hash=genesis_hash(account_id=account_id, tenant_id=tenant_id, currency=currency,
                                  normal_balance=normal_balance, allow_negative=allow_negative))


async def _open(uow: UnitOfWork, account: repository.NewAccount) -> bool:
    inserted = await repository.insert_account(uow.session, account)
    if inserted:
        uow.add(account_opened_event(account_id=account.id, tenant_id=account.tenant_id, currency=account.currency,
                                     normal_balance=account.normal_balance, allow_negative=account.allow_negative,
                                     system_code=account.system_code))
    return inserted


async def _ensure_system_accounts(uow: UnitOfWork, *, tenant_id: str, currency: str) -> dict[str, uuid.UUID]:
    """The tenant's system accounts in `currency`, opened on first need. Concurrent
    openers meet on the unique index: one inserts, the other finds it."""
    found = await repository.system_account_ids(uow.session, tenant_id=tenant_id, currency=currency)
    missing = [code for code in SYSTEM_ACCOUNTS if code not in found]
    for code in missing:
        normal, _why = SYSTEM_ACCOUNTS[code]
        # System accounts are clearing accounts: they legitimately pass through zero.
        await _open(uow, _new_account(tenant_id=tenant_id, name=code, currency=currency, normal_balance=normal,
                                      allow_negative=True, system_code=code, metadata={}))
    if missing:
        found = await repository.system_account_ids(uow.session, tenant_id=tenant_id, currency=currency)
    return found


async def create_account(*, uow: UnitOfWork, tenant_id: str, request: AccountCreate) -> repository.AccountRow:
    await _ensure_system_accounts(uow, tenant_id=tenant_id, currency=request.currency)
    account = _new_account(tenant_id=tenant_id, name=request.name, currency=request.currency,
                           normal_balance=request.normal_balance, allow_negative=request.allow_negative,
                           system_code=None, metadata=dict(request.metadata))
    await _open(uow, account)
    row = await repository.get_account(uow.session, tenant_id=tenant_id, account_id=account.id)
    assert row is not None  # inserted just above, in this transaction
    return row


async def get_account(*, sessionmaker: async_sessionmaker[AsyncSession], tenant_id: str,
                      account_id: uuid.UUID) -> repository.AccountRow:
    async with sessionmaker() as session:
        row = await repository.get_account(session, tenant_id=tenant_id, account_id=account_id)
    if row is None:
        raise AccountNotFound(f"No account {account_id}.")
    return row


async def list_accounts(
    *, sessionmaker: async_sessionmaker[AsyncSession], tenant_id: str, limit: int, cursor: str | None,
    currency: str | None, kind: str | None,
) -> tuple[list[repository.AccountRow], str | None]:
    after = _uuid_cursor("account", cursor)
    async with sessionmaker() as session:
        rows = await repository.list_accounts(session, tenant_id=tenant_id, after=after, limit=limit + 1,
                                              currency=currency, kind=kind)
    page = rows[:limit]
    return page, encode_cursor("account", str(page[-1].id)) if len(rows) > limit else None


# ── balances and entries ─────────────────────────────────────────────────────────────


async def get_balance(
    *, sessionmaker: async_sessionmaker[AsyncSession], tenant_id: str, account_id: uuid.UUID,
    as_of: datetime | None,
) -> repository.BalanceSnapshot:
    async with sessionmaker() as session:
        if as_of is None:
            snapshot = await repository.balance_now(session, tenant_id=tenant_id, account_id=account_id)
        else:
            snapshot = await repository.balance_as_of(session, tenant_id=tenant_id, account_id=account_id,
                                                      as_of=as_of)
    if snapshot is None:
        raise AccountNotFound(f"No account {account_id}.")
    return snapshot


@dataclass(frozen=True)
class EntryPage:
    entries: list[repository.EntryRow]
    normal_balance: NormalBalance
    next_cursor: str | None


async def list_entries(
    *, sessionmaker: async_sessionmaker[AsyncSession], tenant_id: str, account_id: uuid.UUID, limit: int,
    cursor: str | None, newest_first: bool,
) -> EntryPage:
    order = "desc" if newest_first else "asc"
    value = decode_cursor(f"entries-{order}", cursor)
    if value is not None and not _VERSION.fullmatch(value):  # a version is a bigint: 18 digits at most
        raise InvalidCursor("The cursor is not one this list returned.")
    position = int(value) if value is not None else None
    async with sessionmaker() as session:
        account = await repository.get_account(session, tenant_id=tenant_id, account_id=account_id)
        if account is None:
            raise AccountNotFound(f"No account {account_id}.")
        rows = await repository.list_entries(
            session, account_id=account_id, limit=limit + 1,
            before_version=position if newest_first else None,
            after_version=None if newest_first else position, newest_first=newest_first)
    page = rows[:limit]
    next_cursor = encode_cursor(f"entries-{order}", str(page[-1].account_version)) if len(rows) > limit else None
    return EntryPage(page, NormalBalance(account.normal_balance), next_cursor)


# ── posting ──────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Posting:
    """One transaction a caller asks for, before the rules have seen it."""

    legs: list[Leg]
    kind: TransactionKind = TransactionKind.STANDARD
    external_id: str | None = None
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    reverses_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Outcome:
    index: int
    transaction: Transaction | None = None
    refusal: DomainError | None = None


def _posting(request: TransactionCreate) -> Posting:
    legs = [Leg(e.account_id, Direction(e.direction), e.amount, EntryKind.POSTED, e.currency)
            for e in request.entries]
    return Posting(legs=legs, external_id=request.external_id, description=request.description,
                   metadata=dict(request.metadata))


def _refusal_at(error: DomainError, *, index: int) -> DomainError:
    """The same refusal, saying which item of a bulk request it is about."""
    errors = [{**e, "pointer": e.get("pointer", "/body").replace("/body", f"/body/transactions/{index}", 1)}
              for e in (error.errors or [])]
    refused = type(error)(f"Transaction {index}: {error.detail}", errors=errors or None, headers=error.headers,
                          **{**error.extra, "index": index})
    return refused


def _external_id_conflict(external_id: str, existing: uuid.UUID | None) -> ExternalIdConflict:
    extra = {"transaction_id": str(existing)} if existing else {}
    return ExternalIdConflict(f"external_id {external_id!r} already names another transaction of this tenant.",
                              external_id=external_id, **extra)


def _violated_constraint(exc: IntegrityError) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        name = getattr(candidate, "constraint_name", None)
        if name:
            return name
    return None


async def _write_postings(uow: UnitOfWork, *, transactions: Sequence[Transaction], **kwargs) -> None:
    """Every journal write goes through here, so postings per second are counted once, and
    only for transactions that committed."""
    await repository.write_postings(uow.session, transactions=transactions, **kwargs)
    kinds = collections.Counter(t.kind.value for t in transactions)
    uow.after_commit(lambda: [TRANSACTIONS_POSTED.labels(kind).inc(n) for kind, n in kinds.items()])


async def _post(uow: UnitOfWork, *, tenant_id: str, postings: Sequence[Posting], atomic: bool,
                bulk: bool = False) -> list[Outcome]:
    """Post each posting against the locked accounts in order. Atomic: the first refusal
    refuses all (saying which item, for a bulk request). Otherwise refused postings are
    skipped and the rest are written."""
    wanted_ids = [leg.account_id for p in postings for leg in p.legs]
    external_ids = [p.external_id for p in postings if p.external_id]
    existing = await repository.existing_external_ids(uow.session, tenant_id=tenant_id, external_ids=external_ids)
    states, now = await repository.lock_accounts(uow.session, tenant_id=tenant_id, account_ids=wanted_ids)
    book = Book(states, now=now)

    outcomes: list[Outcome] = []
    seen_external: set[str] = set()
    for index, posting in enumerate(postings):
        try:
            for position, leg in enumerate(posting.legs):
                if leg.account_id not in book.accounts:
                    raise AccountNotFound(
                        f"No account {leg.account_id}.",
                        errors=[{"pointer": f"/body/entries/{position}/account_id",
                                 "code": "account_not_found", "detail": "No such account."}])
            if posting.external_id is not None:
                if posting.external_id in existing:
                    raise _external_id_conflict(posting.external_id, existing[posting.external_id])
                if posting.external_id in seen_external:
                    raise DuplicateExternalId(f"external_id {posting.external_id!r} appears twice in this request.")
            transaction = book.post(
                transaction_id=new_id(), tenant_id=tenant_id, kind=posting.kind, legs=posting.legs,
                external_id=posting.external_id, description=posting.description, metadata=posting.metadata,
                reverses_id=posting.reverses_id)
        except DomainError as refusal:
            if atomic:
                raise _refusal_at(refusal, index=index) if bulk else refusal
            outcomes.append(Outcome(index, refusal=refusal))
            continue
        if posting.external_id is not None:
            seen_external.add(posting.external_id)
        outcomes.append(Outcome(index, transaction=transaction))

    posted = [o.transaction for o in outcomes if o.transaction is not None]
    if posted:
        # The events go in the same statement as the journal rows (the hot path: no extra
        # round trips while the balance rows are locked); every one is about a new
        # transaction, as write_postings requires.
        events = [event for t in posted if (event := transaction_posted_event(t)) is not None]
        try:
            await _write_postings(uow, tenant_id=tenant_id, transactions=posted,
                                            accounts=book.changed(), events=events)
        except IntegrityError as exc:
            # Only a concurrent writer can get here (the pre-checks passed): name it.
            constraint = _violated_constraint(exc)
            if constraint == "transactions_external_id":
                raise ExternalIdConflict("An external_id of this request was just used by a concurrent request.") \
                    from None
            if constraint == "transactions_reversal":
                raise AlreadyReversed("The transaction was just reversed by a concurrent request.") from None
            raise
    return outcomes


async def post_transaction(*, uow: UnitOfWork, tenant_id: str, request: TransactionCreate) -> Transaction:
    outcome, = await _post(uow, tenant_id=tenant_id, postings=[_posting(request)], atomic=True)
    assert outcome.transaction is not None  # atomic: a refusal raised
    return outcome.transaction


async def post_transactions(
    *, uow: UnitOfWork, tenant_id: str, requests: Sequence[TransactionCreate], atomic: bool
) -> list[Outcome]:
    postings = [_posting(r) for r in requests]
    return await _post(uow, tenant_id=tenant_id, postings=postings, atomic=atomic, bulk=True)


def refusal_problem(refusal: DomainError) -> dict:
    return problem_body(refusal.status, code=refusal.code, title=refusal.title, detail=refusal.detail,
                        errors=refusal.errors, **refusal.extra)


async def reverse_transaction(
    *, uow: UnitOfWork, tenant_id: str, transaction_id: uuid.UUID, request: ReversalCreate
) -> Transaction:
    """A correction is a new transaction that mirrors the original's posted entries and
    points at it; the original is never touched. One reversal per transaction."""
    original = await repository.get_transaction(uow.session, tenant_id=tenant_id, transaction_id=transaction_id)
    if original is None:
        raise TransactionNotFound(f"No transaction {transaction_id}.")
    legs = reversal_legs(original)
    reversal = await repository.reversal_of(uow.session, tenant_id=tenant_id, transaction_id=transaction_id)
    if reversal is not None:
        raise AlreadyReversed(f"Transaction {transaction_id} was already reversed by {reversal}.",
                              reversal_id=str(reversal))
    posting = Posting(legs=legs, kind=TransactionKind.REVERSAL, reverses_id=original.id,
                      external_id=request.external_id,
                      description=request.description if request.description is not None
                      else f"Reversal of {original.id}",
                      metadata=dict(request.metadata))
    outcome, = await _post(uow, tenant_id=tenant_id, postings=[posting], atomic=True)
    assert outcome.transaction is not None
    return outcome.transaction


async def get_transaction(*, sessionmaker: async_sessionmaker[AsyncSession], tenant_id: str,
                          transaction_id: uuid.UUID) -> Transaction:
    async with sessionmaker() as session:
        found = await repository.get_transaction(session, tenant_id=tenant_id, transaction_id=transaction_id)
    if found is None:
        raise TransactionNotFound(f"No transaction {transaction_id}.")
    return found


async def list_transactions(
    *, sessionmaker: async_sessionmaker[AsyncSession], tenant_id: str, external_id: str | None, limit: int,
    cursor: str | None,
) -> tuple[list[Transaction], str | None]:
    after = _uuid_cursor("transaction", cursor)
    async with sessionmaker() as session:
        found = await repository.list_transactions(session, tenant_id=tenant_id, external_id=external_id,
                                                   after=after, limit=limit + 1)
    page = found[:limit]
    return page, encode_cursor("transaction", str(page[-1].id)) if len(found) > limit else None


# ── holds ────────────────────────────────────────────────────────────────────────────


async def _lock_book(uow: UnitOfWork, *, tenant_id: str, account_ids: Sequence[uuid.UUID]) -> Book:
    states, now = await repository.lock_accounts(uow.session, tenant_id=tenant_id, account_ids=account_ids)
    return Book(states, now=now)


async def _place(uow: UnitOfWork, *, hold: Hold, asserted_currency: str | None) -> Transaction:
    """Lock both accounts, check, then write the pending entries and the hold. Every
    refusal is raised before anything is written, so a caller may catch it and go on."""
    legs = hold.placement_legs()
    book = await _lock_book(uow, tenant_id=hold.tenant_id, account_ids=[hold.debit_account_id, hold.credit_account_id])
    for pointer, account_id in (("/body/debit_account_id", hold.debit_account_id),
                                ("/body/credit_account_id", hold.credit_account_id)):
        if account_id not in book.accounts:
            raise AccountNotFound(f"No account {account_id}.",
                                  errors=[{"pointer": pointer, "code": "account_not_found",
                                           "detail": "No such account."}])
    debit, credit = book.accounts[hold.debit_account_id], book.accounts[hold.credit_account_id]
    if debit.currency != credit.currency:
        raise CurrencyMismatch(f"A hold moves one currency: {debit.id} holds {debit.currency}, "
                               f"{credit.id} holds {credit.currency}.")
    if asserted_currency is not None and asserted_currency != debit.currency:
        raise CurrencyMismatch(f"The hold says {asserted_currency} but the accounts hold {debit.currency}.",
                               errors=[{"pointer": "/body/currency", "code": "currency_mismatch",
                                        "detail": f"The accounts hold {debit.currency}."}])
    if hold.expires_at is not None and hold.expires_at <= book.now:
        raise InvalidExpiry("expires_at must be in the future.",
                            errors=[{"pointer": "/body/expires_at", "code": "invalid_expiry",
                                     "detail": "In the past."}])
    hold.currency = debit.currency
    transaction = book.post(transaction_id=new_id(), tenant_id=hold.tenant_id, kind=TransactionKind.HOLD_PLACED,
                            legs=legs, description=hold.description, hold_id=hold.id, payment_id=hold.payment_id)
    hold.placed(transaction)
    await _write_postings(uow, tenant_id=hold.tenant_id, transactions=[transaction],
                                    accounts=book.changed())
    await repository.insert_hold(uow.session, hold)
    uow.track(hold)
    return transaction


async def place_hold(*, uow: UnitOfWork, tenant_id: str, request: HoldCreate) -> Hold:
    hold = Hold(id=new_id(), tenant_id=tenant_id, debit_account_id=request.debit_account_id,
                credit_account_id=request.credit_account_id, currency=request.currency or "",
                amount=request.amount, expires_at=request.expires_at, description=request.description)
    await _place(uow, hold=hold, asserted_currency=request.currency)
    return hold


def _resolve_in(book: Book, uow: UnitOfWork, *, hold: Hold, post_amount: int | None, void_reason: str | None,
                expired: bool = False) -> Transaction:
    """Post (`void_reason` None) or void a locked pending hold against a locked book."""
    if void_reason is None:
        legs, kind = hold.posting_legs(amount=post_amount, now=book.now), TransactionKind.HOLD_POSTED
    else:
        legs, kind = hold.voiding_legs(), TransactionKind.HOLD_VOIDED
    transaction = book.post(transaction_id=new_id(), tenant_id=hold.tenant_id, kind=kind, legs=legs,
                            hold_id=hold.id, payment_id=hold.payment_id)
    if void_reason is None:
        hold.posted(transaction)
        if (event := transaction_posted_event(transaction)) is not None:
            uow.add(event)
    else:
        hold.voided(transaction, reason=void_reason, expired=expired)
    uow.track(hold)
    return transaction


async def _resolve(uow: UnitOfWork, *, hold: Hold, post_amount: int | None, void_reason: str | None) -> Transaction:
    book = await _lock_book(uow, tenant_id=hold.tenant_id, account_ids=[hold.debit_account_id, hold.credit_account_id])
    transaction = _resolve_in(book, uow, hold=hold, post_amount=post_amount, void_reason=void_reason)
    await _write_postings(uow, tenant_id=hold.tenant_id, transactions=[transaction],
                                    accounts=book.changed())
    await repository.resolve_hold(uow.session, hold)
    return transaction


async def _locked_hold(uow: UnitOfWork, *, tenant_id: str, hold_id: uuid.UUID) -> Hold:
    hold = await repository.get_hold(uow.session, tenant_id=tenant_id, hold_id=hold_id, for_update=True)
    if hold is None:
        raise HoldNotFound(f"No hold {hold_id}.")
    return hold


def _not_a_payments(hold: Hold) -> None:
    # A payment's hold follows the payment (settled → posted, failed → voided); payments
    # reads a void as "the reservation is gone". Nobody else may resolve it.
    if hold.payment_id is not None:
        raise HoldOwnedByPayment(f"Hold {hold.id} reserves payment {hold.payment_id}; the payment's outcome "
                                 "posts or voids it.", payment_id=hold.payment_id)


async def post_hold(*, uow: UnitOfWork, tenant_id: str, hold_id: uuid.UUID, amount: int | None) -> Hold:
    hold = await _locked_hold(uow, tenant_id=tenant_id, hold_id=hold_id)
    _not_a_payments(hold)
    await _resolve(uow, hold=hold, post_amount=amount, void_reason=None)
    return hold


async def void_hold(*, uow: UnitOfWork, tenant_id: str, hold_id: uuid.UUID, reason: str | None) -> Hold:
    hold = await _locked_hold(uow, tenant_id=tenant_id, hold_id=hold_id)
    _not_a_payments(hold)
    await _resolve(uow, hold=hold, post_amount=None, void_reason=reason or "voided")
    return hold


async def get_hold(*, sessionmaker: async_sessionmaker[AsyncSession], tenant_id: str, hold_id: uuid.UUID) -> Hold:
    async with sessionmaker() as session:
        hold = await repository.get_hold(session, tenant_id=tenant_id, hold_id=hold_id)
    if hold is None:
        raise HoldNotFound(f"No hold {hold_id}.")
    return hold


async def list_holds(
    *, sessionmaker: async_sessionmaker[AsyncSession], tenant_id: str, limit: int, cursor: str | None,
    status: str | None, account_id: uuid.UUID | None, payment_id: str | None,
) -> tuple[list[Hold], str | None]:
    after = _uuid_cursor("hold", cursor)
    async with sessionmaker() as session:
        holds = await repository.list_holds(session, tenant_id=tenant_id, after=after, limit=limit + 1,
                                            status=status, account_id=account_id, payment_id=payment_id)
    page = holds[:limit]
    return page, encode_cursor("hold", str(page[-1].id)) if len(holds) > limit else None


async def expire_holds(*, uow: UnitOfWork, limit: int = 100) -> int:
    """Void the pending holds whose expiry has passed (any tenant), oldest first. Holds
    other workers are resolving are skipped, not waited for. All balance rows of the
    batch are locked at once, in the one account order."""
    locked = await repository.lock_expired_holds(uow.session, limit=limit)
    holds = [hold for hold_id, tenant_id in locked
             if (hold := await repository.get_hold(uow.session, tenant_id=tenant_id, hold_id=hold_id)) is not None]
    by_tenant: dict[str, list[Hold]] = {}
    for hold in holds:
        by_tenant.setdefault(hold.tenant_id, []).append(hold)
    for tenant_id in sorted(by_tenant):
        tenant_holds = by_tenant[tenant_id]
        book = await _lock_book(uow, tenant_id=tenant_id, account_ids=[
            a for h in tenant_holds for a in (h.debit_account_id, h.credit_account_id)])
        transactions = [_resolve_in(book, uow, hold=hold, post_amount=None, void_reason="expired", expired=True)
                        for hold in tenant_holds]
        await _write_postings(uow, tenant_id=tenant_id, transactions=transactions,
                                        accounts=book.changed())
        for hold in tenant_holds:
            await repository.resolve_hold(uow.session, hold)
    return len(holds)


# ── the payment flow (consumers) ─────────────────────────────────────────────────────


async def _lock_payment(uow: UnitOfWork, *, tenant_id: str, payment_id: str) -> None:
    """Serialise every decision about one payment (first step of the lock order), so
    that two deliveries of different events for it cannot both decide."""
    await uow.session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                              {"key": f"ledger.payment:{tenant_id}:{payment_id}"})


def _parse_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def reserve_for_payment(*, uow: UnitOfWork, tenant_id: str, event_id: uuid.UUID,
                              payment: PaymentApproved) -> str:
    """`payment.approved`: hold the amount on the payment's debit account, crediting the
    tenant's payouts_in_transit. One decision per payment, whatever is redelivered.
    Returns the outcome (placed, rejected, or already_decided)."""
    await _lock_payment(uow, tenant_id=tenant_id, payment_id=payment.payment_id)
    if await repository.get_reservation(uow.session, tenant_id=tenant_id, payment_id=payment.payment_id):
        return "already_decided"

    async def reject(reason: str) -> str:
        await repository.insert_reservation(uow.session, tenant_id=tenant_id, payment_id=payment.payment_id,
                                            outcome="rejected", hold_id=None, reason=reason, event_id=event_id)
        uow.add(hold_rejected_event(tenant_id=tenant_id, payment_id=payment.payment_id,
                                    account_id=payment.debit_account_id, amount=payment.amount,
                                    currency=payment.currency, reason=reason))
        return "rejected"

    account_id = _parse_uuid(payment.debit_account_id)
    account = await repository.get_account(uow.session, tenant_id=tenant_id, account_id=account_id) \
        if account_id else None
    if account is None:
        return await reject("account_not_found")
    if account.currency != payment.currency or payment.currency not in CURRENCY_EXPONENTS:
        return await reject("currency_mismatch")
    system = await _ensure_system_accounts(uow, tenant_id=tenant_id, currency=payment.currency)
    hold = Hold(id=new_id(), tenant_id=tenant_id, debit_account_id=account.id,
                credit_account_id=system["payouts_in_transit"], currency=payment.currency, amount=payment.amount,
                payment_id=payment.payment_id, description=f"Reservation for payment {payment.payment_id}")
    try:
        await _place(uow, hold=hold, asserted_currency=payment.currency)
    except InsufficientFunds:
        return await reject("insufficient_funds")
    await repository.insert_reservation(uow.session, tenant_id=tenant_id, payment_id=payment.payment_id,
                                        outcome="placed", hold_id=hold.id, reason=None, event_id=event_id)
    return "placed"


async def _skip(uow: UnitOfWork, *, tenant_id: str, event_id: uuid.UUID, payment_id: str, reason: str,
                amount: int | None, currency: str | None) -> str:
    await repository.insert_reservation(uow.session, tenant_id=tenant_id, payment_id=payment_id, outcome="skipped",
                                        hold_id=None, reason=reason, event_id=event_id)
    uow.add(hold_skipped_event(tenant_id=tenant_id, payment_id=payment_id, reason=reason, amount=amount,
                               currency=currency))
    return "skipped"


async def settle_payment(*, uow: UnitOfWork, tenant_id: str, event_id: uuid.UUID, payment: PaymentSettled) -> str:
    """`payment.settled`: post the payment's hold (debit customer, credit
    payouts_in_transit, posted). Without a hold nothing moves; the fact is recorded."""
    await _lock_payment(uow, tenant_id=tenant_id, payment_id=payment.payment_id)
    reservation = await repository.get_reservation(uow.session, tenant_id=tenant_id, payment_id=payment.payment_id)
    if reservation is None:
        log.warning("payment %s settled without any hold; nothing posted", payment.payment_id,
                    extra={"payment_id": payment.payment_id})
        return await _skip(uow, tenant_id=tenant_id, event_id=event_id, payment_id=payment.payment_id,
                           reason="payment_settled_without_hold", amount=payment.amount, currency=payment.currency)
    if reservation.outcome != "placed":
        log.warning("payment %s settled but its hold was %s; nothing posted", payment.payment_id,
                    reservation.outcome, extra={"payment_id": payment.payment_id})
        return f"no_hold_{reservation.outcome}"
    hold = await _locked_hold(uow, tenant_id=tenant_id, hold_id=reservation.hold_id)
    if hold.status is not HoldStatus.PENDING:
        if hold.status is not HoldStatus.POSTED:
            log.error("payment %s settled but its hold %s is %s; nothing posted", payment.payment_id, hold.id,
                      hold.status, extra={"payment_id": payment.payment_id})
        return f"hold_already_{hold.status}"
    if payment.currency != hold.currency or payment.amount > hold.amount:
        raise PaymentContractViolation(
            f"payment {payment.payment_id} settled {payment.amount} {payment.currency} but its hold {hold.id} "
            f"reserves {hold.amount} {hold.currency}")
    await _resolve(uow, hold=hold, post_amount=payment.amount, void_reason=None)
    return "posted"


async def refund_payment(*, uow: UnitOfWork, tenant_id: str, event_id: uuid.UUID, refund: PaymentRefunded) -> str:
    """`payment.refunded`: the refunded amount goes back to the customer's account, out of
    payouts_in_transit (the mirror of the settlement's posting, for that amount). Posted
    once per refund id, whatever is redelivered; never more than the payment posted."""
    await _lock_payment(uow, tenant_id=tenant_id, payment_id=refund.payment_id)
    if await repository.get_refund(uow.session, tenant_id=tenant_id, refund_id=refund.refund_id) is not None:
        return "already_posted"
    reservation = await repository.get_reservation(uow.session, tenant_id=tenant_id, payment_id=refund.payment_id)
    hold = await repository.get_hold(uow.session, tenant_id=tenant_id, hold_id=reservation.hold_id) \
        if reservation is not None and reservation.hold_id is not None else None
    if hold is None or hold.status is not HoldStatus.POSTED:
        raise PaymentContractViolation(
            f"payment {refund.payment_id} refunded {refund.amount} {refund.currency}, but the ledger posted no "
            f"settlement for it (hold {'absent' if hold is None else hold.status})")
    refunded = await repository.refunded_amount(uow.session, tenant_id=tenant_id, payment_id=refund.payment_id)
    if refund.currency != hold.currency or refunded + refund.amount > hold.amount_posted:
        raise PaymentContractViolation(
            f"payment {refund.payment_id} refunded {refund.amount} {refund.currency} after {refunded}, but its "
            f"settlement posted {hold.amount_posted} {hold.currency}")
    customer, transit = hold.debit_account_id, hold.credit_account_id
    book = await _lock_book(uow, tenant_id=tenant_id, account_ids=[customer, transit])
    transaction = book.post(
        transaction_id=new_id(), tenant_id=tenant_id, kind=TransactionKind.PAYMENT_REFUND,
        legs=[Leg(transit, Direction.DEBIT, refund.amount, EntryKind.POSTED, hold.currency),
              Leg(customer, Direction.CREDIT, refund.amount, EntryKind.POSTED, hold.currency)],
        description=f"Refund {refund.refund_id} of payment {refund.payment_id}", payment_id=refund.payment_id)
    event = transaction_posted_event(transaction)
    event.payload["refund_id"] = refund.refund_id
    await _write_postings(uow, tenant_id=tenant_id, transactions=[transaction], accounts=book.changed(),
                          events=[event])
    await repository.insert_refund(uow.session, tenant_id=tenant_id, refund_id=refund.refund_id,
                                   payment_id=refund.payment_id, transaction_id=transaction.id,
                                   amount=refund.amount, event_id=event_id)
    return "posted"


async def close_payment(*, uow: UnitOfWork, tenant_id: str, event_id: uuid.UUID, payment: PaymentClosed,
                        cancelled: bool) -> str:
    """`payment.failed` / `payment.cancelled`: void the payment's hold, releasing the
    reservation. Before any hold, record that none may be placed any more."""
    await _lock_payment(uow, tenant_id=tenant_id, payment_id=payment.payment_id)
    reservation = await repository.get_reservation(uow.session, tenant_id=tenant_id, payment_id=payment.payment_id)
    if reservation is None:
        reason = "payment_cancelled_before_hold" if cancelled else "payment_failed_before_hold"
        return await _skip(uow, tenant_id=tenant_id, event_id=event_id, payment_id=payment.payment_id,
                           reason=reason, amount=payment.amount, currency=payment.currency)
    if reservation.outcome != "placed":
        return f"no_hold_{reservation.outcome}"
    hold = await _locked_hold(uow, tenant_id=tenant_id, hold_id=reservation.hold_id)
    if hold.status is not HoldStatus.PENDING:
        if hold.status is HoldStatus.POSTED:
            log.error("payment %s %s after its hold %s was posted; nothing voided", payment.payment_id,
                      "cancelled" if cancelled else "failed", hold.id, extra={"payment_id": payment.payment_id})
        return f"hold_already_{hold.status}"
    reason = ("payment_cancelled" if cancelled else "payment_failed")
    detail = payment.reason if cancelled else payment.failure_reason
    await _resolve(uow, hold=hold, post_amount=None, void_reason=f"{reason}: {detail}"[:200] if detail else reason)
    return "voided"

