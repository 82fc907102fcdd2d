"""The ledger's rules: double entry, balances, holds and the tamper-evident hash.

What it decides: whether a set of entries may be posted (it balances per currency and
layer, no non-negative account goes below zero, no total leaves its bounds), what the
account totals are after each entry (the running balance every entry stores), and the
hash that chains each journal transaction to the previous transaction of every account
it touches. A hold is a two-phase transfer (TigerBeetle's pending/post/void): placing it
writes *pending* entries, posting or voiding it *releases* them, and posting also writes
*posted* entries.

It never does I/O, never reads a clock (times are passed in) and never rounds: amounts
are integer minor units. `verify` recomputes hashes with the same functions, so the
canonical form below may only change together with a new hash version.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from operator import attrgetter
from typing import Any

import orjson

from shared.errors import Conflict, ValidationFailed
from shared.events import Aggregate, DomainEvent
from shared.money import MAX_MONEY_MINOR

HASH_VERSION = b"clearhouse.ledger.v1\n"
GENESIS_PREFIX = b"clearhouse.ledger.genesis.v1\n"


class Direction(StrEnum):
    DEBIT = "debit"
    CREDIT = "credit"

    @property
    def opposite(self) -> Direction:
        return Direction.CREDIT if self is Direction.DEBIT else Direction.DEBIT


class NormalBalance(StrEnum):
    DEBIT = "debit"
    CREDIT = "credit"


class EntryKind(StrEnum):
    """The layer an entry moves: `posted` money, `pending` (a hold's reservation), or
    `released` (the end of a reservation, by post or void). Each balances on its own."""

    POSTED = "posted"
    PENDING = "pending"
    RELEASED = "released"


class TransactionKind(StrEnum):
    STANDARD = "standard"
    REVERSAL = "reversal"
    HOLD_PLACED = "hold_placed"
    HOLD_POSTED = "hold_posted"
    HOLD_VOIDED = "hold_voided"
    PAYMENT_REFUND = "payment_refund"  # money a refunded payment gives back to its customer


class HoldStatus(StrEnum):
    PENDING = "pending"
    POSTED = "posted"
    VOIDED = "voided"
    EXPIRED = "expired"


# ── errors the rules raise (HTTP status and stable code travel with them) ───────────


class UnbalancedTransaction(ValidationFailed):
    code = "unbalanced_transaction"
    title = "Unbalanced transaction"


class InsufficientFunds(ValidationFailed):
    code = "insufficient_funds"
    title = "Insufficient funds"


class CurrencyMismatch(ValidationFailed):
    code = "currency_mismatch"
    title = "Currency mismatch"


class BalanceLimitExceeded(ValidationFailed):
    code = "balance_limit_exceeded"
    title = "Balance limit exceeded"


class DuplicateExternalId(ValidationFailed):
    code = "duplicate_external_id"
    title = "Duplicate external_id"


class SameAccount(ValidationFailed):
    code = "same_account"
    title = "Same account on both sides"


class AmountExceedsHold(ValidationFailed):
    code = "amount_exceeds_hold"
    title = "Amount exceeds the hold"


class HoldNotPending(Conflict):
    code = "hold_not_pending"
    title = "Hold not pending"


class HoldOwnedByPayment(Conflict):
    code = "hold_owned_by_payment"
    title = "Hold owned by a payment"


class HoldExpired(Conflict):
    code = "hold_expired"
    title = "Hold expired"


class NotReversible(Conflict):
    code = "transaction_not_reversible"
    title = "Transaction not reversible"


# ── balances ─────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Totals:
    """An account's four running totals (TigerBeetle's debits/credits posted/pending).
    Every balance is derived from them, so they are what the journal stores."""

    posted_debits: int = 0
    posted_credits: int = 0
    pending_debits: int = 0
    pending_credits: int = 0

    def apply(self, direction: Direction, kind: EntryKind, amount: int) -> Totals:
        # Spelled out rather than dataclasses.replace: this runs for every entry of a bulk.
        pd, pc, qd, qc = self.posted_debits, self.posted_credits, self.pending_debits, self.pending_credits
        debit = direction is Direction.DEBIT
        if kind is EntryKind.POSTED:
            return Totals(pd + amount, pc, qd, qc) if debit else Totals(pd, pc + amount, qd, qc)
        signed = amount if kind is EntryKind.PENDING else -amount
        return Totals(pd, pc, qd + signed, qc) if debit else Totals(pd, pc, qd, qc + signed)

    def posted(self, normal: NormalBalance) -> int:
        if normal is NormalBalance.CREDIT:
            return self.posted_credits - self.posted_debits
        return self.posted_debits - self.posted_credits

    def pending(self, normal: NormalBalance) -> int:
        """The balance once every pending entry posts (Modern Treasury's pending balance)."""
        credits = self.posted_credits + self.pending_credits
        debits = self.posted_debits + self.pending_debits
        return credits - debits if normal is NormalBalance.CREDIT else debits - credits

    def available(self, normal: NormalBalance) -> int:
        """Posted minus pending outflows: pending inflows are not spendable yet."""
        if normal is NormalBalance.CREDIT:
            return self.posted_credits - self.posted_debits - self.pending_debits
        return self.posted_debits - self.posted_credits - self.pending_credits

    def within_bounds(self) -> bool:
        return (0 <= self.posted_debits <= MAX_MONEY_MINOR and 0 <= self.posted_credits <= MAX_MONEY_MINOR
                and 0 <= self.pending_debits <= MAX_MONEY_MINOR and 0 <= self.pending_credits <= MAX_MONEY_MINOR)


@dataclass(frozen=True, slots=True)
class AccountState:
    """An account as a posting sees it: its immutable facts plus its projection row, read
    under the row lock that serialises every writer of this account."""

    id: uuid.UUID
    tenant_id: str
    currency: str
    normal_balance: NormalBalance
    allow_negative: bool
    totals: Totals
    version: int  # entries applied so far; the next entry gets version + 1
    head_hash: bytes  # hash of the last transaction that touched the account (or its genesis)
    last_posted_at: datetime | None


# ── postings ─────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Leg:
    """One requested entry. `currency`, when given, is the caller's assertion."""

    account_id: uuid.UUID
    direction: Direction
    amount: int
    kind: EntryKind = EntryKind.POSTED
    currency: str | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    transaction_id: uuid.UUID
    index: int
    account_id: uuid.UUID
    account_version: int
    direction: Direction
    kind: EntryKind
    amount: int
    currency: str
    posted_at: datetime
    totals: Totals  # the account's totals right after this entry


@dataclass(frozen=True, slots=True)
class Transaction:
    id: uuid.UUID
    tenant_id: str
    kind: TransactionKind
    posted_at: datetime
    entries: tuple[Entry, ...]
    hash: bytes
    external_id: str | None = None
    description: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    reverses_id: uuid.UUID | None = None
    hold_id: uuid.UUID | None = None
    payment_id: str | None = None

    def posted_entries(self) -> list[Entry]:
        return [e for e in self.entries if e.kind is EntryKind.POSTED]


def check_balanced(legs: Sequence[Leg], currency_of: Mapping[uuid.UUID, str]) -> None:
    """Debits equal credits per currency and per layer, with at least two legs."""
    if len(legs) < 2:
        raise UnbalancedTransaction("A transaction needs at least two entries.")
    sums: dict[tuple[str, EntryKind], list[int]] = {}
    for leg in legs:
        pair = sums.setdefault((currency_of[leg.account_id], leg.kind), [0, 0])
        pair[0 if leg.direction is Direction.DEBIT else 1] += leg.amount
    if all(debits == credits for debits, credits in sums.values()):
        return
    problems = [
        f"{currency}{'' if kind is EntryKind.POSTED else f' ({kind} layer)'}: debits {debits} ≠ credits {credits}"
        for (currency, kind), (debits, credits) in sorted(sums.items())
        if debits != credits
    ]
    if problems:
        raise UnbalancedTransaction(
            "Debits and credits must be equal in each currency; " + "; ".join(problems) + ".",
            imbalances=[
                {"currency": currency, "layer": str(kind), "debits": debits, "credits": credits}
                for (currency, kind), (debits, credits) in sorted(sums.items()) if debits != credits
            ],
        )


class Book:
    """The accounts one unit of work has locked, and the transactions posted against them
    in order. A transaction either applies entirely or not at all (an error leaves the
    book as it was), so a bulk request can skip a refused item and go on."""

    def __init__(self, accounts: Iterable[AccountState], *, now: datetime) -> None:
        self.accounts: dict[uuid.UUID, AccountState] = {a.id: a for a in accounts}
        self.now = now  # the database clock read under the locks
        self.touched: set[uuid.UUID] = set()

    def post(
        self,
        *,
        transaction_id: uuid.UUID,
        tenant_id: str,
        kind: TransactionKind,
        legs: Sequence[Leg],
        external_id: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, str] | None = None,
        reverses_id: uuid.UUID | None = None,
        hold_id: uuid.UUID | None = None,
        payment_id: str | None = None,
    ) -> Transaction:
        # One dictionary probe per leg: account ids are UUIDs, whose hash is Python code.
        work: dict[uuid.UUID, list] = {}  # account id → [state, totals, version]
        for position, leg in enumerate(legs):
            slot = work.get(leg.account_id)
            if slot is None:
                state = self.accounts[leg.account_id]
                slot = work[leg.account_id] = [state, state.totals, state.version]
            if leg.currency is not None and leg.currency != slot[0].currency:
                raise CurrencyMismatch(
                    f"Entry {position} says {leg.currency} but account {leg.account_id} holds {slot[0].currency}.",
                    errors=[{"pointer": f"/body/entries/{position}/currency", "code": "currency_mismatch",
                             "detail": f"The account holds {slot[0].currency}."}],
                )
        check_balanced(legs, {account_id: slot[0].currency for account_id, slot in work.items()})

        # Never earlier than any entry already on these accounts: a balance as of an
        # instant is "the last entry at or before it", which needs per-account order.
        posted_at = self.now
        for slot in work.values():
            if slot[0].last_posted_at is not None and slot[0].last_posted_at > posted_at:
                posted_at = slot[0].last_posted_at
        entries: list[Entry] = []
        for index, leg in enumerate(legs):
            slot = work[leg.account_id]
            after = slot[1].apply(leg.direction, leg.kind, leg.amount)
            if not after.within_bounds():
                raise BalanceLimitExceeded(
                    f"Account {leg.account_id} would leave the supported range of totals "
                    f"(0 to {MAX_MONEY_MINOR} minor units per total).", account_id=str(leg.account_id))
            slot[1] = after
            slot[2] += 1
            entries.append(Entry(transaction_id, index, leg.account_id, slot[2], leg.direction, leg.kind, leg.amount,
                                 slot[0].currency, posted_at, after))
        for account_id, (state, totals, _version) in work.items():
            available = totals.available(state.normal_balance)
            if not state.allow_negative and available < 0:
                before = state.totals.available(state.normal_balance)
                raise InsufficientFunds(
                    f"Account {account_id} has {before} available in {state.currency}; "
                    f"this needs {before - available}.",
                    account_id=str(account_id), available=before, required=before - available,
                )

        metadata = dict(metadata or {})
        digest = transaction_hash(
            id=transaction_id, tenant_id=tenant_id, kind=kind, posted_at=posted_at, entries=entries,
            external_id=external_id, description=description, metadata=metadata, reverses_id=reverses_id,
            hold_id=hold_id, payment_id=payment_id,
            previous={account_id: slot[0].head_hash for account_id, slot in work.items()})
        transaction = Transaction(transaction_id, tenant_id, kind, posted_at, tuple(entries), digest, external_id,
                                  description, metadata, reverses_id, hold_id, payment_id)
        for account_id, (state, totals, version) in work.items():
            self.accounts[account_id] = AccountState(state.id, state.tenant_id, state.currency, state.normal_balance,
                                                     state.allow_negative, totals, version, digest, posted_at)
            self.touched.add(account_id)
        return transaction

    def changed(self) -> list[AccountState]:
        return [self.accounts[a] for a in sorted(self.touched)]


def reversal_legs(original: Transaction) -> list[Leg]:
    """The mirror of the original's posted entries. Pending and released entries belong
    to a hold's life and are corrected by voiding or posting it, never by reversal."""
    if original.kind in (TransactionKind.HOLD_PLACED, TransactionKind.HOLD_VOIDED):
        raise NotReversible(f"Transaction {original.id} is part of a hold; void or post the hold instead.")
    posted = original.posted_entries()
    if not posted:  # unreachable for standard/reversal/hold_posted, which always post
        raise NotReversible(f"Transaction {original.id} moved no posted money.")
    return [Leg(e.account_id, e.direction.opposite, e.amount) for e in posted]


# ── holds ────────────────────────────────────────────────────────────────────────────


class Hold(Aggregate):
    """A two-phase transfer: money reserved on `debit_account_id` (pending debit) for
    `credit_account_id` (pending credit), then posted (fully or partly) or voided, once."""

    def __init__(
        self,
        *,
        id: uuid.UUID,
        tenant_id: str,
        debit_account_id: uuid.UUID,
        credit_account_id: uuid.UUID,
        currency: str,
        amount: int,
        status: HoldStatus = HoldStatus.PENDING,
        amount_posted: int = 0,
        payment_id: str | None = None,
        description: str | None = None,
        expires_at: datetime | None = None,
        placed_transaction_id: uuid.UUID | None = None,
        resolved_transaction_id: uuid.UUID | None = None,
        void_reason: str | None = None,
        created_at: datetime | None = None,
        resolved_at: datetime | None = None,
    ) -> None:
        super().__init__()
        self.id = id
        self.tenant_id = tenant_id
        self.debit_account_id = debit_account_id
        self.credit_account_id = credit_account_id
        self.currency = currency
        self.amount = amount
        self.status = status
        self.amount_posted = amount_posted
        self.payment_id = payment_id
        self.description = description
        self.expires_at = expires_at
        self.placed_transaction_id = placed_transaction_id
        self.resolved_transaction_id = resolved_transaction_id
        self.void_reason = void_reason
        self.created_at = created_at
        self.resolved_at = resolved_at

    # Placing ---------------------------------------------------------------------------
    def placement_legs(self) -> list[Leg]:
        if self.debit_account_id == self.credit_account_id:
            raise SameAccount("A hold moves money between two different accounts.")
        return [Leg(self.debit_account_id, Direction.DEBIT, self.amount, EntryKind.PENDING),
                Leg(self.credit_account_id, Direction.CREDIT, self.amount, EntryKind.PENDING)]

    def placed(self, transaction: Transaction) -> None:
        self.placed_transaction_id = transaction.id
        self.created_at = transaction.posted_at
        self.record(hold_placed_event(self, transaction))

    # Resolving -------------------------------------------------------------------------
    def _release_legs(self) -> list[Leg]:
        return [Leg(self.debit_account_id, Direction.DEBIT, self.amount, EntryKind.RELEASED),
                Leg(self.credit_account_id, Direction.CREDIT, self.amount, EntryKind.RELEASED)]

    def _require_pending(self) -> None:
        if self.status is not HoldStatus.PENDING:
            raise HoldNotPending(f"Hold {self.id} is already {self.status}.", hold_status=str(self.status))

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def posting_legs(self, *, amount: int | None, now: datetime) -> list[Leg]:
        """Release the whole reservation and post `amount` of it (all of it by default);
        whatever is not posted returns to the debit account's available balance."""
        self._require_pending()
        if self.is_expired(now):
            raise HoldExpired(f"Hold {self.id} expired at {self.expires_at.isoformat()}.")
        amount = self.amount if amount is None else amount
        if amount > self.amount:
            raise AmountExceedsHold(f"Hold {self.id} reserves {self.amount}; {amount} cannot be posted.",
                                    hold_amount=self.amount)
        return [*self._release_legs(),
                Leg(self.debit_account_id, Direction.DEBIT, amount),
                Leg(self.credit_account_id, Direction.CREDIT, amount)]

    def voiding_legs(self) -> list[Leg]:
        self._require_pending()
        return self._release_legs()

    def posted(self, transaction: Transaction) -> None:
        self.status = HoldStatus.POSTED
        self.amount_posted = sum(e.amount for e in transaction.posted_entries() if e.direction is Direction.DEBIT)
        self._resolved(transaction)
        self.record(hold_posted_event(self, transaction))

    def voided(self, transaction: Transaction, *, reason: str, expired: bool = False) -> None:
        self.status = HoldStatus.EXPIRED if expired else HoldStatus.VOIDED
        self.void_reason = reason
        self._resolved(transaction)
        self.record(hold_voided_event(self, transaction))

    def _resolved(self, transaction: Transaction) -> None:
        self.resolved_transaction_id = transaction.id
        self.resolved_at = transaction.posted_at


# ── the hash chain ───────────────────────────────────────────────────────────────────


_BY_INDEX = attrgetter("index")


def _timestamp(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def genesis_hash(*, account_id: uuid.UUID, tenant_id: str, currency: str, normal_balance: str,
                 allow_negative: bool) -> bytes:
    """The head of an account's chain before its first transaction: it binds the
    account's identity, so rewriting an account's currency breaks every hash after it."""
    canonical = orjson.dumps([str(account_id), tenant_id, currency, str(normal_balance), allow_negative])
    return hashlib.sha256(GENESIS_PREFIX + canonical).digest()


def transaction_hash(
    *,
    id: uuid.UUID,
    tenant_id: str,
    kind: TransactionKind | str,
    posted_at: datetime,
    entries: Sequence[Entry],
    external_id: str | None,
    description: str | None,
    metadata: Mapping[str, str],
    reverses_id: uuid.UUID | None,
    hold_id: uuid.UUID | None,
    payment_id: str | None,
    previous: Mapping[uuid.UUID, bytes],
) -> bytes:
    """sha256 over the transaction's canonical content and, for every account it touches,
    the hash of that account's previous transaction: one chain per account, and each
    transaction links all of its accounts' chains (a DAG). Writers of an account already
    hold its lock, so this costs no extra contention, unlike one global chain head."""
    content: dict[str, Any] = {
        "id": str(id),
        "tenant_id": tenant_id,
        "kind": str(kind),
        "posted_at": _timestamp(posted_at),
        "external_id": external_id,
        "description": description,
        "metadata": dict(metadata),
        "reverses_id": str(reverses_id) if reverses_id else None,
        "hold_id": str(hold_id) if hold_id else None,
        "payment_id": payment_id,
        "entries": [
            [str(e.account_id), e.account_version, str(e.direction), str(e.kind), e.amount, e.currency,
             e.totals.posted_debits, e.totals.posted_credits, e.totals.pending_debits, e.totals.pending_credits]
            for e in sorted(entries, key=_BY_INDEX)
        ],
        # Sorted by the ids' text, which orders exactly as the UUIDs do (fixed-width hex).
        "previous": sorted([str(account), digest.hex()] for account, digest in previous.items()),
    }
    return hashlib.sha256(HASH_VERSION + orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).digest()


# ── events (payloads per docs/events.md; schemas in schemas.EVENT_SCHEMAS) ───────────


def _entry_payload(entry: Entry) -> dict[str, Any]:
    return {"account_id": str(entry.account_id), "direction": str(entry.direction), "amount": entry.amount,
            "currency": entry.currency}


def account_opened_event(*, account_id: uuid.UUID, tenant_id: str, currency: str, normal_balance: str,
                         allow_negative: bool, system_code: str | None) -> DomainEvent:
    # The account's name stays out: tenants name accounts after people.
    return DomainEvent(
        "ledger.account.opened.v1", "account", str(account_id),
        {"account_id": str(account_id), "currency": currency, "normal_balance": str(normal_balance),
         "allow_negative": allow_negative, "system_code": system_code},
        tenant_id=tenant_id,
    )


def _with_payment(payload: dict[str, Any], payment_id: str | None) -> dict[str, Any]:
    # "payment_id (if any)": absent rather than null when there is none, which also keeps
    # such events out of the event log's payment index (WHERE payload ? 'payment_id').
    if payment_id is not None:
        payload["payment_id"] = payment_id
    return payload


def transaction_posted_event(transaction: Transaction) -> DomainEvent | None:
    """`ledger.transaction.posted.v1` for every transaction that moves posted money (a
    hold's placement and void only move pending money and say so in hold events)."""
    posted = transaction.posted_entries()
    if not posted:
        return None
    return DomainEvent(
        "ledger.transaction.posted.v1", "transaction", str(transaction.id),
        _with_payment({
            "transaction_id": str(transaction.id),
            "external_id": transaction.external_id,
            "entries": [_entry_payload(e) for e in posted],
            "posted_at": transaction.posted_at.isoformat(),
            "kind": str(transaction.kind),
            "reverses_id": str(transaction.reverses_id) if transaction.reverses_id else None,
            "hold_id": str(transaction.hold_id) if transaction.hold_id else None,
            "hash": transaction.hash.hex(),
        }, transaction.payment_id),
        tenant_id=transaction.tenant_id,
    )


def hold_placed_event(hold: Hold, transaction: Transaction) -> DomainEvent:
    return DomainEvent(
        "ledger.hold.placed.v1", "hold", str(hold.id),
        _with_payment({
            "hold_id": str(hold.id),
            "account_id": str(hold.debit_account_id),
            "counter_account_id": str(hold.credit_account_id),
            "amount": hold.amount,
            "currency": hold.currency,
            "expires_at": hold.expires_at.isoformat() if hold.expires_at else None,
            "transaction_id": str(transaction.id),
            "placed_at": transaction.posted_at.isoformat(),
        }, hold.payment_id),
        tenant_id=hold.tenant_id,
    )


def hold_posted_event(hold: Hold, transaction: Transaction) -> DomainEvent:
    return DomainEvent(
        "ledger.hold.posted.v1", "hold", str(hold.id),
        _with_payment({
            "hold_id": str(hold.id),
            "amount": hold.amount_posted,
            "currency": hold.currency,
            "transaction_id": str(transaction.id),
            "posted_at": transaction.posted_at.isoformat(),
            "hold_amount": hold.amount,
        }, hold.payment_id),
        tenant_id=hold.tenant_id,
    )


def hold_voided_event(hold: Hold, transaction: Transaction) -> DomainEvent:
    return DomainEvent(
        "ledger.hold.voided.v1", "hold", str(hold.id),
        _with_payment({
            "hold_id": str(hold.id),
            "amount": hold.amount,
            "currency": hold.currency,
            "reason": hold.void_reason,
            "transaction_id": str(transaction.id),
            "voided_at": transaction.posted_at.isoformat(),
        }, hold.payment_id),
        tenant_id=hold.tenant_id,
    )


def hold_rejected_event(*, tenant_id: str, payment_id: str, account_id: str, amount: int, currency: str,
                        reason: str) -> DomainEvent:
    # No hold exists, so the payment's reservation is the aggregate (keyed by payment id).
    return DomainEvent(
        "ledger.hold.rejected.v1", "payment_reservation", payment_id,
        {"payment_id": payment_id, "account_id": account_id, "amount": amount, "currency": currency,
         "reason": reason},
        tenant_id=tenant_id,
    )


def hold_skipped_event(*, tenant_id: str, payment_id: str, reason: str, amount: int | None,
                       currency: str | None) -> DomainEvent:
    """A payment ended (settled, failed or cancelled) before any hold was decided for it:
    nothing moves, and the decision is recorded so that a late `payment.approved` does
    not reserve money for a payment that is already over."""
    return DomainEvent(
        "ledger.hold.skipped.v1", "payment_reservation", payment_id,
        {"payment_id": payment_id, "reason": reason, "amount": amount, "currency": currency},
        tenant_id=tenant_id,
    )
