"""SQL of the ledger: typed models for reads, set-based statements for the write path.

Every read takes the tenant and filters on it, so another tenant's object is simply not
found. Writers lock balance rows in account-id order (the one lock order in the service,
so writers never deadlock) and write a whole batch of postings (transactions, entries,
balance moves) in one statement. This module never decides anything about money: the
rules are in `domain`, the sequencing in `service`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import BigInteger, Boolean, DateTime, LargeBinary, SmallInteger, String, Text, select, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.ledger.domain import (
    AccountState, Direction, Entry, EntryKind, Hold, HoldStatus, NormalBalance, Totals, Transaction, TransactionKind,
)
from shared import context
from shared.events import DomainEvent, schema_version
from shared.uow import current_traceparent

# ── typed models (reads) ─────────────────────────────────────────────────────────────


class Base(DeclarativeBase):
    pass


class AccountRow(Base):
    __tablename__ = "accounts"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    currency: Mapped[str] = mapped_column(String(3))
    normal_balance: Mapped[str] = mapped_column(Text)
    allow_negative: Mapped[bool] = mapped_column(Boolean)
    system_code: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BalanceRow(Base):
    __tablename__ = "balances"

    account_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    currency: Mapped[str] = mapped_column(String(3))
    normal_balance: Mapped[str] = mapped_column(Text)
    allow_negative: Mapped[bool] = mapped_column(Boolean)
    posted_debits: Mapped[int] = mapped_column(BigInteger)
    posted_credits: Mapped[int] = mapped_column(BigInteger)
    pending_debits: Mapped[int] = mapped_column(BigInteger)
    pending_credits: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[bytes] = mapped_column(LargeBinary)
    last_posted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TransactionRow(Base):
    __tablename__ = "transactions"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSONB)
    reverses_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    hold_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    payment_id: Mapped[str | None] = mapped_column(Text)
    posted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    hash: Mapped[bytes] = mapped_column(LargeBinary)


class EntryRow(Base):
    __tablename__ = "entries"

    transaction_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    entry_index: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    account_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    account_version: Mapped[int] = mapped_column(BigInteger)
    direction: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    posted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    posted_debits: Mapped[int] = mapped_column(BigInteger)
    posted_credits: Mapped[int] = mapped_column(BigInteger)
    pending_debits: Mapped[int] = mapped_column(BigInteger)
    pending_credits: Mapped[int] = mapped_column(BigInteger)

    def totals(self) -> Totals:
        return Totals(self.posted_debits, self.posted_credits, self.pending_debits, self.pending_credits)


class HoldRow(Base):
    __tablename__ = "holds"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    debit_account_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    credit_account_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    currency: Mapped[str] = mapped_column(String(3))
    amount: Mapped[int] = mapped_column(BigInteger)
    amount_posted: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text)
    payment_id: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    placed_transaction_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    resolved_transaction_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    void_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ReservationRow(Base):
    __tablename__ = "payment_reservations"

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    payment_id: Mapped[str] = mapped_column(Text, primary_key=True)
    outcome: Mapped[str] = mapped_column(Text)
    hold_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    reason: Mapped[str | None] = mapped_column(Text)
    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# ── accounts ─────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class NewAccount:
    id: uuid.UUID
    tenant_id: str
    name: str
    currency: str
    normal_balance: str
    allow_negative: bool
    system_code: str | None
    metadata: dict[str, str]
    genesis_hash: bytes


_INSERT_ACCOUNT = text(
    """
    WITH account AS (
        INSERT INTO accounts (id, tenant_id, name, currency, normal_balance, allow_negative, system_code, metadata)
        VALUES (:id, :tenant_id, :name, :currency, :normal_balance, :allow_negative, :system_code,
                CAST(:metadata AS jsonb))
        ON CONFLICT (tenant_id, system_code, currency) WHERE system_code IS NOT NULL DO NOTHING
        RETURNING id, tenant_id, currency, normal_balance, allow_negative
    )
    INSERT INTO balances (account_id, tenant_id, currency, normal_balance, allow_negative, head_hash)
    SELECT id, tenant_id, currency, normal_balance, allow_negative, :genesis_hash FROM account
    RETURNING account_id
    """
)


async def insert_account(session: AsyncSession, account: NewAccount) -> bool:
    """Insert the account and its zero balance; False when it is a system account that
    already exists (created concurrently by another writer)."""
    result = await session.execute(_INSERT_ACCOUNT, {
        "id": account.id, "tenant_id": account.tenant_id, "name": account.name, "currency": account.currency,
        "normal_balance": account.normal_balance, "allow_negative": account.allow_negative,
        "system_code": account.system_code, "metadata": orjson.dumps(account.metadata).decode(),
        "genesis_hash": account.genesis_hash,
    })
    return result.first() is not None


async def system_account_ids(session: AsyncSession, *, tenant_id: str, currency: str) -> dict[str, uuid.UUID]:
    rows = await session.execute(
        select(AccountRow.system_code, AccountRow.id).where(
            AccountRow.tenant_id == tenant_id, AccountRow.currency == currency, AccountRow.system_code.is_not(None)))
    return {code: account_id for code, account_id in rows}


async def get_account(session: AsyncSession, *, tenant_id: str, account_id: uuid.UUID) -> AccountRow | None:
    return (await session.execute(
        select(AccountRow).where(AccountRow.id == account_id, AccountRow.tenant_id == tenant_id))).scalar_one_or_none()


async def list_accounts(
    session: AsyncSession, *, tenant_id: str, after: uuid.UUID | None, limit: int, currency: str | None,
    kind: str | None,
) -> list[AccountRow]:
    query = select(AccountRow).where(AccountRow.tenant_id == tenant_id)
    if after is not None:
        query = query.where(AccountRow.id > after)
    if currency is not None:
        query = query.where(AccountRow.currency == currency)
    if kind == "system":
        query = query.where(AccountRow.system_code.is_not(None))
    elif kind == "customer":
        query = query.where(AccountRow.system_code.is_(None))
    return list((await session.execute(query.order_by(AccountRow.id).limit(limit))).scalars())


# ── locking and balances ─────────────────────────────────────────────────────────────

# ORDER BY below FOR NO KEY UPDATE: rows are locked in account-id order, the single lock
# order of the service, so two writers sharing accounts queue instead of deadlocking.
# clock_timestamp() is the database's clock: one time source for every API replica.
_LOCK_BALANCES = text(
    """
    SELECT account_id, tenant_id, currency, normal_balance, allow_negative, posted_debits, posted_credits,
           pending_debits, pending_credits, version, head_hash, last_posted_at, clock_timestamp() AS now
    FROM balances
    WHERE account_id = ANY(CAST(:ids AS uuid[])) AND tenant_id = :tenant_id
    ORDER BY account_id
    FOR NO KEY UPDATE
    """
)


def _state(row: Any) -> AccountState:
    return AccountState(
        id=row.account_id, tenant_id=row.tenant_id, currency=row.currency,
        normal_balance=NormalBalance(row.normal_balance), allow_negative=row.allow_negative,
        totals=Totals(row.posted_debits, row.posted_credits, row.pending_debits, row.pending_credits),
        version=row.version, head_hash=bytes(row.head_hash), last_posted_at=row.last_posted_at,
    )


async def lock_accounts(
    session: AsyncSession, *, tenant_id: str, account_ids: Iterable[uuid.UUID]
) -> tuple[list[AccountState], datetime]:
    """The tenant's accounts among `account_ids`, locked until commit, and the database
    clock. Unknown (or other tenants') ids are simply absent from the answer."""
    rows = (await session.execute(_LOCK_BALANCES, {"ids": sorted(set(account_ids)), "tenant_id": tenant_id})).all()
    if not rows:
        now = (await session.execute(text("SELECT clock_timestamp()"))).scalar_one()
        return [], now
    return [_state(row) for row in rows], max(row.now for row in rows)


async def database_now(session: AsyncSession) -> datetime:
    return (await session.execute(text("SELECT clock_timestamp()"))).scalar_one()


_BALANCE_AS_OF = text(
    """
    SELECT a.id AS account_id, a.currency, a.normal_balance, e.posted_debits, e.posted_credits, e.pending_debits,
           e.pending_credits, e.account_version
    FROM accounts a
    LEFT JOIN LATERAL (
        SELECT posted_debits, posted_credits, pending_debits, pending_credits, account_version
        FROM entries
        WHERE account_id = a.id AND posted_at <= :as_of
        ORDER BY posted_at DESC, account_version DESC
        LIMIT 1
    ) e ON true
    WHERE a.id = :account_id AND a.tenant_id = :tenant_id
    """
)


@dataclass(frozen=True)
class BalanceSnapshot:
    account_id: uuid.UUID
    currency: str
    normal_balance: NormalBalance
    totals: Totals
    version: int
    as_of: datetime


async def balance_as_of(
    session: AsyncSession, *, tenant_id: str, account_id: uuid.UUID, as_of: datetime
) -> BalanceSnapshot | None:
    """The totals of the last entry at or before `as_of` (zero before the first): one
    backward probe of entries_account_time, whatever the number of entries."""
    row = (await session.execute(_BALANCE_AS_OF, {"account_id": account_id, "tenant_id": tenant_id,
                                                  "as_of": as_of})).one_or_none()
    if row is None:
        return None
    totals = Totals(row.posted_debits or 0, row.posted_credits or 0, row.pending_debits or 0,
                    row.pending_credits or 0)
    return BalanceSnapshot(row.account_id, row.currency, NormalBalance(row.normal_balance), totals,
                           row.account_version or 0, as_of)


async def balance_now(session: AsyncSession, *, tenant_id: str, account_id: uuid.UUID) -> BalanceSnapshot | None:
    row = (await session.execute(
        select(BalanceRow, text("clock_timestamp()")).where(
            BalanceRow.account_id == account_id, BalanceRow.tenant_id == tenant_id))).one_or_none()
    if row is None:
        return None
    balance, now = row
    totals = Totals(balance.posted_debits, balance.posted_credits, balance.pending_debits, balance.pending_credits)
    return BalanceSnapshot(balance.account_id, balance.currency, NormalBalance(balance.normal_balance), totals,
                           balance.version, now)


async def list_entries(
    session: AsyncSession, *, account_id: uuid.UUID, before_version: int | None, after_version: int | None,
    limit: int, newest_first: bool,
) -> list[EntryRow]:
    """Entries of one account (the caller has checked its tenant), by account version."""
    query = select(EntryRow).where(EntryRow.account_id == account_id)
    if before_version is not None:
        query = query.where(EntryRow.account_version < before_version)
    if after_version is not None:
        query = query.where(EntryRow.account_version > after_version)
    order = EntryRow.account_version.desc() if newest_first else EntryRow.account_version.asc()
    return list((await session.execute(query.order_by(order).limit(limit))).scalars())


# ── the journal ──────────────────────────────────────────────────────────────────────

# Rows travel as three JSON documents rather than ~30 typed arrays: orjson encodes a
# thousand rows in microseconds, where per-element array encoding costs more than the
# database's work. json_to_recordset types every column explicitly.
_WRITE_POSTINGS = text(
    """
    WITH new_transactions AS (
        INSERT INTO transactions (id, tenant_id, kind, external_id, description, metadata, reverses_id, hold_id,
                                  payment_id, posted_at, hash)
        SELECT id, :tenant_id, kind, external_id, description, metadata, reverses_id, hold_id, payment_id, posted_at,
               decode(hash, 'hex')
        FROM json_to_recordset(CAST(:transactions AS json)) AS x(
            id uuid, kind text, external_id text, description text, metadata jsonb, reverses_id uuid, hold_id uuid,
            payment_id text, posted_at timestamptz, hash text)
    ), new_entries AS (
        INSERT INTO entries (transaction_id, entry_index, tenant_id, account_id, account_version, direction, kind,
                             amount, currency, posted_at, posted_debits, posted_credits, pending_debits,
                             pending_credits)
        SELECT t, i, :tenant_id, a, v, d, k, n, c, p, pd, pc, qd, qc
        FROM json_to_recordset(CAST(:entries AS json)) AS x(
            t uuid, i smallint, a uuid, v bigint, d text, k text, n bigint, c text, p timestamptz,
            pd bigint, pc bigint, qd bigint, qc bigint)
    ), moved AS (
        UPDATE balances AS b
        SET posted_debits = u.pd, posted_credits = u.pc, pending_debits = u.qd, pending_credits = u.qc,
            version = u.v, head_hash = decode(u.h, 'hex'), last_posted_at = u.p
        FROM json_to_recordset(CAST(:balances AS json)) AS u(
            a uuid, pd bigint, pc bigint, qd bigint, qc bigint, v bigint, h text, p timestamptz)
        WHERE b.account_id = u.a AND b.tenant_id = :tenant_id
        RETURNING 1
    ), new_events AS (
        INSERT INTO events (id, tenant_id, aggregate_type, aggregate_id, type, schema_version, payload, actor,
                            reason, correlation_id, causation_id, traceparent, occurred_at)
        SELECT * FROM json_to_recordset(CAST(:events AS json)) AS x(
            id uuid, tenant_id text, aggregate_type text, aggregate_id text, type text, schema_version integer,
            payload jsonb, actor text, reason text, correlation_id text, causation_id text, traceparent text,
            occurred_at timestamptz)
    )
    SELECT count(*) FROM moved
    """
)


def event_rows(events: Sequence[DomainEvent]) -> list[dict[str, Any]]:
    """The event log rows for `events`, stamped as `shared.uow.write_events` stamps them:
    what the event already carries wins, the context fills the rest (tenant, actor,
    correlation, causation, trace). A test holds the two paths to the same columns."""
    ctx = context.current()
    traceparent = current_traceparent()
    return [{"id": e.id, "tenant_id": e.tenant_id or ctx.tenant_id, "aggregate_type": e.aggregate_type,
             "aggregate_id": e.aggregate_id, "type": e.type, "schema_version": schema_version(e.type),
             "payload": e.payload, "actor": e.actor or ctx.actor or "system:unknown", "reason": e.reason,
             "correlation_id": e.correlation_id or ctx.correlation_id,
             "causation_id": e.causation_id or ctx.causation_id, "traceparent": e.traceparent or traceparent,
             "occurred_at": e.occurred_at} for e in events]


def _json_default(value: Any) -> Any:
    # asyncpg hands back its own uuid.UUID subclass, and metadata may be any Mapping.
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not a journal value")


def _json(rows: list[dict[str, Any]]) -> str:
    return orjson.dumps(rows, default=_json_default).decode()


async def write_postings(
    session: AsyncSession, *, tenant_id: str, transactions: Sequence[Transaction], accounts: Sequence[AccountState],
    events: Sequence[DomainEvent] = (),
) -> None:
    """Append the transactions and their entries, move the balances and append `events` to
    the event log, in one statement (one round trip while the balance rows are locked).
    The balance check at commit and the entry guard run inside PostgreSQL.

    `events` must belong to aggregates created in this database transaction: the kit's
    per-aggregate advisory lock (which orders concurrent writers of one aggregate) is
    not taken, because no other writer can know such an aggregate before commit."""
    rows = _json([
        {"id": t.id, "kind": t.kind, "external_id": t.external_id, "description": t.description,
         "metadata": t.metadata, "reverses_id": t.reverses_id, "hold_id": t.hold_id, "payment_id": t.payment_id,
         "posted_at": t.posted_at, "hash": t.hash.hex()}
        for t in transactions
    ])
    entries = _json([
        {"t": e.transaction_id, "i": e.index, "a": e.account_id, "v": e.account_version, "d": e.direction,
         "k": e.kind, "n": e.amount, "c": e.currency, "p": e.posted_at, "pd": e.totals.posted_debits,
         "pc": e.totals.posted_credits, "qd": e.totals.pending_debits, "qc": e.totals.pending_credits}
        for t in transactions for e in t.entries
    ])
    balances = _json([
        {"a": a.id, "pd": a.totals.posted_debits, "pc": a.totals.posted_credits, "qd": a.totals.pending_debits,
         "qc": a.totals.pending_credits, "v": a.version, "h": a.head_hash.hex(), "p": a.last_posted_at}
        for a in accounts
    ])
    moved = (await session.execute(_WRITE_POSTINGS, {
        "tenant_id": tenant_id, "transactions": rows, "entries": entries, "balances": balances,
        "events": _json(event_rows(events))})).scalar_one()
    if moved != len(accounts):  # the rows are locked by us: anything else is a bug, never a state to commit
        raise RuntimeError(f"moved {moved} balance rows, expected {len(accounts)}")


async def existing_external_ids(
    session: AsyncSession, *, tenant_id: str, external_ids: Sequence[str]
) -> dict[str, uuid.UUID]:
    if not external_ids:
        return {}
    rows = await session.execute(
        select(TransactionRow.external_id, TransactionRow.id).where(
            TransactionRow.tenant_id == tenant_id, TransactionRow.external_id.in_(list(external_ids))))
    return {external_id: transaction_id for external_id, transaction_id in rows}


def _transaction(row: TransactionRow, entries: Sequence[EntryRow]) -> Transaction:
    return Transaction(
        id=row.id, tenant_id=row.tenant_id, kind=TransactionKind(row.kind), posted_at=row.posted_at,
        entries=tuple(
            Entry(e.transaction_id, e.entry_index, e.account_id, e.account_version, Direction(e.direction),
                  EntryKind(e.kind), e.amount, e.currency, e.posted_at, e.totals())
            for e in sorted(entries, key=lambda e: e.entry_index)
        ),
        hash=bytes(row.hash), external_id=row.external_id, description=row.description,
        metadata=dict(row.metadata_), reverses_id=row.reverses_id, hold_id=row.hold_id, payment_id=row.payment_id,
    )


async def transactions_by_ids(session: AsyncSession, *, tenant_id: str, ids: Sequence[uuid.UUID]) -> list[Transaction]:
    if not ids:
        return []
    rows = list((await session.execute(
        select(TransactionRow).where(TransactionRow.id.in_(list(ids)), TransactionRow.tenant_id == tenant_id)
    )).scalars())
    entries = list((await session.execute(
        select(EntryRow).where(EntryRow.transaction_id.in_([r.id for r in rows]))
    )).scalars()) if rows else []
    by_transaction: dict[uuid.UUID, list[EntryRow]] = {}
    for entry in entries:
        by_transaction.setdefault(entry.transaction_id, []).append(entry)
    order = {transaction_id: position for position, transaction_id in enumerate(ids)}
    return sorted((_transaction(r, by_transaction.get(r.id, [])) for r in rows), key=lambda t: order[t.id])


async def get_transaction(session: AsyncSession, *, tenant_id: str, transaction_id: uuid.UUID) -> Transaction | None:
    found = await transactions_by_ids(session, tenant_id=tenant_id, ids=[transaction_id])
    return found[0] if found else None


async def list_transactions(
    session: AsyncSession, *, tenant_id: str, external_id: str | None, after: uuid.UUID | None, limit: int
) -> list[Transaction]:
    query = select(TransactionRow.id).where(TransactionRow.tenant_id == tenant_id)
    if external_id is not None:
        query = query.where(TransactionRow.external_id == external_id)
    if after is not None:
        query = query.where(TransactionRow.id > after)
    ids = list((await session.execute(query.order_by(TransactionRow.id).limit(limit))).scalars())
    return await transactions_by_ids(session, tenant_id=tenant_id, ids=ids)


async def reversal_of(session: AsyncSession, *, tenant_id: str, transaction_id: uuid.UUID) -> uuid.UUID | None:
    return (await session.execute(select(TransactionRow.id).where(
        TransactionRow.reverses_id == transaction_id, TransactionRow.tenant_id == tenant_id))).scalar_one_or_none()


# ── holds ────────────────────────────────────────────────────────────────────────────


def _hold(row: HoldRow) -> Hold:
    return Hold(
        id=row.id, tenant_id=row.tenant_id, debit_account_id=row.debit_account_id,
        credit_account_id=row.credit_account_id, currency=row.currency, amount=row.amount,
        status=HoldStatus(row.status), amount_posted=row.amount_posted, payment_id=row.payment_id,
        description=row.description, expires_at=row.expires_at, placed_transaction_id=row.placed_transaction_id,
        resolved_transaction_id=row.resolved_transaction_id, void_reason=row.void_reason,
        created_at=row.created_at, resolved_at=row.resolved_at,
    )


async def get_hold(
    session: AsyncSession, *, tenant_id: str, hold_id: uuid.UUID, for_update: bool = False
) -> Hold | None:
    query = select(HoldRow).where(HoldRow.id == hold_id, HoldRow.tenant_id == tenant_id)
    if for_update:
        # Hold row before balance rows, always: the second fixed step of the lock order.
        query = query.with_for_update(key_share=True)  # FOR NO KEY UPDATE
    row = (await session.execute(query)).scalar_one_or_none()
    return _hold(row) if row else None


async def hold_for_payment(session: AsyncSession, *, tenant_id: str, payment_id: str,
                           for_update: bool = False) -> Hold | None:
    query = select(HoldRow).where(HoldRow.tenant_id == tenant_id, HoldRow.payment_id == payment_id)
    if for_update:
        query = query.with_for_update(key_share=True)  # FOR NO KEY UPDATE
    row = (await session.execute(query)).scalar_one_or_none()
    return _hold(row) if row else None


async def list_holds(
    session: AsyncSession, *, tenant_id: str, after: uuid.UUID | None, limit: int, status: str | None,
    account_id: uuid.UUID | None, payment_id: str | None,
) -> list[Hold]:
    query = select(HoldRow).where(HoldRow.tenant_id == tenant_id)
    if after is not None:
        query = query.where(HoldRow.id > after)
    if status is not None:
        query = query.where(HoldRow.status == status)
    if account_id is not None:
        query = query.where(HoldRow.debit_account_id == account_id)
    if payment_id is not None:
        query = query.where(HoldRow.payment_id == payment_id)
    return [_hold(r) for r in (await session.execute(query.order_by(HoldRow.id).limit(limit))).scalars()]


_INSERT_HOLD = text(
    """
    INSERT INTO holds (id, tenant_id, debit_account_id, credit_account_id, currency, amount, status, payment_id,
                       description, expires_at, placed_transaction_id, created_at)
    VALUES (:id, :tenant_id, :debit_account_id, :credit_account_id, :currency, :amount, 'pending', :payment_id,
            :description, :expires_at, :placed_transaction_id, :created_at)
    """
)

_RESOLVE_HOLD = text(
    """
    UPDATE holds SET status = :status, amount_posted = :amount_posted,
                     resolved_transaction_id = :resolved_transaction_id, void_reason = :void_reason,
                     resolved_at = :resolved_at
    WHERE id = :id AND tenant_id = :tenant_id AND status = 'pending'
    """
)


async def insert_hold(session: AsyncSession, hold: Hold) -> None:
    await session.execute(_INSERT_HOLD, {
        "id": hold.id, "tenant_id": hold.tenant_id, "debit_account_id": hold.debit_account_id,
        "credit_account_id": hold.credit_account_id, "currency": hold.currency, "amount": hold.amount,
        "payment_id": hold.payment_id, "description": hold.description, "expires_at": hold.expires_at,
        "placed_transaction_id": hold.placed_transaction_id, "created_at": hold.created_at,
    })


async def resolve_hold(session: AsyncSession, hold: Hold) -> None:
    result = await session.execute(_RESOLVE_HOLD, {
        "id": hold.id, "tenant_id": hold.tenant_id, "status": str(hold.status), "amount_posted": hold.amount_posted,
        "resolved_transaction_id": hold.resolved_transaction_id, "void_reason": hold.void_reason,
        "resolved_at": hold.resolved_at,
    })
    if result.rowcount != 1:  # we hold the row lock and saw it pending: anything else is a bug
        raise RuntimeError(f"hold {hold.id} was not pending when resolved")


_EXPIRED_HOLDS = text(
    """
    SELECT id, tenant_id FROM holds
    WHERE status = 'pending' AND expires_at IS NOT NULL AND expires_at <= clock_timestamp()
    ORDER BY expires_at
    LIMIT :limit
    FOR NO KEY UPDATE SKIP LOCKED
    """
)


async def lock_expired_holds(session: AsyncSession, *, limit: int) -> list[tuple[uuid.UUID, str]]:
    """Expired pending holds nobody else is resolving right now, locked (hold rows first,
    as every hold writer does)."""
    return [(row.id, row.tenant_id) for row in await session.execute(_EXPIRED_HOLDS, {"limit": limit})]


# ── payment reservations ─────────────────────────────────────────────────────────────


async def get_reservation(session: AsyncSession, *, tenant_id: str, payment_id: str) -> ReservationRow | None:
    return (await session.execute(select(ReservationRow).where(
        ReservationRow.tenant_id == tenant_id, ReservationRow.payment_id == payment_id))).scalar_one_or_none()


_INSERT_RESERVATION = text(
    """
    INSERT INTO payment_reservations (tenant_id, payment_id, outcome, hold_id, reason, event_id)
    VALUES (:tenant_id, :payment_id, :outcome, :hold_id, :reason, :event_id)
    ON CONFLICT (tenant_id, payment_id) DO NOTHING
    RETURNING 1
    """
)


async def insert_reservation(
    session: AsyncSession, *, tenant_id: str, payment_id: str, outcome: str, hold_id: uuid.UUID | None,
    reason: str | None, event_id: uuid.UUID,
) -> bool:
    """Record the one decision for a payment; False if another decision got there first."""
    result = await session.execute(_INSERT_RESERVATION, {
        "tenant_id": tenant_id, "payment_id": payment_id, "outcome": outcome, "hold_id": hold_id, "reason": reason,
        "event_id": event_id})
    return result.first() is not None


# ── payment refunds ─────────────────────────────────────────────────────────────────


async def get_refund(session: AsyncSession, *, tenant_id: str, refund_id: str) -> uuid.UUID | None:
    """The transaction that posted this refund, if any."""
    return (await session.execute(text(
        "SELECT transaction_id FROM payment_refunds WHERE tenant_id = :tenant_id AND refund_id = :refund_id"),
        {"tenant_id": tenant_id, "refund_id": refund_id})).scalar()


async def refunded_amount(session: AsyncSession, *, tenant_id: str, payment_id: str) -> int:
    return (await session.execute(text(
        "SELECT coalesce(sum(amount), 0) FROM payment_refunds WHERE tenant_id = :tenant_id AND payment_id = :payment_id"),
        {"tenant_id": tenant_id, "payment_id": payment_id})).scalar_one()


async def insert_refund(session: AsyncSession, *, tenant_id: str, refund_id: str, payment_id: str,
                        transaction_id: uuid.UUID, amount: int, event_id: uuid.UUID) -> None:
    await session.execute(text(
        "INSERT INTO payment_refunds (tenant_id, refund_id, payment_id, transaction_id, amount, event_id) "
        "VALUES (:tenant_id, :refund_id, :payment_id, :transaction_id, :amount, :event_id)"),
        {"tenant_id": tenant_id, "refund_id": refund_id, "payment_id": payment_id, "transaction_id": transaction_id,
         "amount": amount, "event_id": event_id})
