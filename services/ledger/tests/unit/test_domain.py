"""The ledger's rules without I/O: double entry, running totals, funds checks, holds and
the hash, property-based where money arithmetic is involved."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.ledger.domain import (
    AccountState, AmountExceedsHold, BalanceLimitExceeded, Book, CurrencyMismatch, Direction, EntryKind, Hold,
    HoldExpired, HoldNotPending, HoldStatus, InsufficientFunds, Leg, NormalBalance, NotReversible, Totals,
    TransactionKind, UnbalancedTransaction, check_balanced, genesis_hash, reversal_legs, transaction_hash,
    transaction_posted_event,
)
from services.ledger.schemas import EVENT_SCHEMAS
from shared.money import MAX_AMOUNT_MINOR, MAX_MONEY_MINOR

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
amounts = st.integers(min_value=1, max_value=MAX_AMOUNT_MINOR)


def account(currency: str = "EUR", normal: NormalBalance = NormalBalance.CREDIT, allow_negative: bool = False,
            totals: Totals = Totals()) -> AccountState:
    account_id = uuid.uuid4()
    return AccountState(account_id, "t1", currency, normal, allow_negative, totals, 0,
                        genesis_hash(account_id=account_id, tenant_id="t1", currency=currency,
                                     normal_balance=normal, allow_negative=allow_negative), None)


def post(book: Book, legs: list[Leg], **more):
    return book.post(transaction_id=uuid.uuid4(), tenant_id="t1", kind=more.pop("kind", TransactionKind.STANDARD),
                     legs=legs, **more)


# ── balances ───────────────────────────────────────────────────────────────────────


@given(pd=amounts, pc=amounts, qd=amounts, qc=amounts)
def test_debit_normal_balances_mirror_credit_normal_ones(pd, pc, qd, qc):
    totals = Totals(pd, pc, qd, qc)
    mirror = Totals(pc, pd, qc, qd)
    assert totals.posted(NormalBalance.CREDIT) == mirror.posted(NormalBalance.DEBIT)
    assert totals.pending(NormalBalance.CREDIT) == mirror.pending(NormalBalance.DEBIT)
    assert totals.available(NormalBalance.CREDIT) == mirror.available(NormalBalance.DEBIT)
    # Pending outflows reduce what is available; pending inflows do not add to it.
    assert totals.available(NormalBalance.CREDIT) == totals.posted(NormalBalance.CREDIT) - qd


@given(direction=st.sampled_from(Direction), amount=amounts)
def test_releasing_a_pending_amount_undoes_it(direction, amount):
    start = Totals(5, 6, 7, 8)
    assert start.apply(direction, EntryKind.PENDING, amount).apply(direction, EntryKind.RELEASED, amount) == start


# ── double entry ───────────────────────────────────────────────────────────────────

legs_strategy = st.lists(st.tuples(st.integers(0, 3), amounts), min_size=1, max_size=6)


@given(debits=legs_strategy, credits=legs_strategy)
def test_a_posting_balances_or_is_refused_and_changes_nothing(debits, credits):
    accounts = [account(allow_negative=True) for _ in range(4)]
    book = Book(accounts, now=T0)
    legs = [Leg(accounts[i].id, Direction.DEBIT, n) for i, n in debits] + \
           [Leg(accounts[i].id, Direction.CREDIT, n) for i, n in credits]
    balanced = sum(n for _, n in debits) == sum(n for _, n in credits)
    if not balanced:
        with pytest.raises(UnbalancedTransaction):
            post(book, legs)
        assert book.accounts == {a.id: a for a in accounts}
        return
    try:
        transaction = post(book, legs)
    except BalanceLimitExceeded:
        return
    after = book.accounts.values()
    assert sum(a.totals.posted_debits for a in after) == sum(a.totals.posted_credits for a in after)
    # Each account's versions run on from where they were, one per entry.
    for state in after:
        versions = [e.account_version for e in transaction.entries if e.account_id == state.id]
        assert versions == list(range(1, len(versions) + 1)) and state.version == len(versions)


@given(ops=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(1, 500)), max_size=30))
def test_non_negative_accounts_never_end_a_transaction_below_zero(ops):
    source = account(allow_negative=True)
    wallets = [account(), account(), account(normal=NormalBalance.DEBIT)]
    book = Book([source, *wallets], now=T0)
    post(book, [Leg(source.id, Direction.DEBIT, 1_000), Leg(wallets[0].id, Direction.CREDIT, 1_000)])
    for debit, credit, amount in ops:
        try:
            post(book, [Leg(wallets[debit].id, Direction.DEBIT, amount),
                        Leg(wallets[credit].id, Direction.CREDIT, amount)])
        except InsufficientFunds:
            pass
        for wallet in wallets:
            state = book.accounts[wallet.id]
            assert state.totals.available(state.normal_balance) >= 0


def test_currencies_balance_separately_and_are_checked():
    eur, usd = account("EUR", allow_negative=True), account("USD")
    with pytest.raises(UnbalancedTransaction) as refused:
        check_balanced([Leg(eur.id, Direction.DEBIT, 5), Leg(usd.id, Direction.CREDIT, 5)],
                       {eur.id: "EUR", usd.id: "USD"})
    assert refused.value.extra["imbalances"] == [
        {"currency": "EUR", "layer": "posted", "debits": 5, "credits": 0},
        {"currency": "USD", "layer": "posted", "debits": 0, "credits": 5}]
    with pytest.raises(CurrencyMismatch):
        post(Book([eur, usd], now=T0), [Leg(eur.id, Direction.DEBIT, 5, currency="USD"),
                                         Leg(eur.id, Direction.CREDIT, 5)])


def test_totals_stay_within_bigint():
    whale = account(allow_negative=True, totals=Totals(posted_debits=MAX_MONEY_MINOR))
    sink = account()
    with pytest.raises(BalanceLimitExceeded):
        post(Book([whale, sink], now=T0), [Leg(whale.id, Direction.DEBIT, 1), Leg(sink.id, Direction.CREDIT, 1)])


def test_posting_times_never_go_back_on_an_account():
    later = T0 + timedelta(seconds=5)
    a, b = account(allow_negative=True), account()
    book = Book([a, b], now=later)
    post(book, [Leg(a.id, Direction.DEBIT, 1), Leg(b.id, Direction.CREDIT, 1)])
    # A second writer whose clock reads earlier still posts at or after the last entry.
    second = Book(book.changed(), now=T0)
    transaction = post(second, [Leg(a.id, Direction.DEBIT, 1), Leg(b.id, Direction.CREDIT, 1)])
    assert transaction.posted_at == later


# ── holds ──────────────────────────────────────────────────────────────────────────


def placed_hold(amount: int = 100, expires_at=None):
    customer, transit = account(), account(allow_negative=True)
    book = Book([customer, transit], now=T0)
    post(book, [Leg(transit.id, Direction.DEBIT, 1_000), Leg(customer.id, Direction.CREDIT, 1_000)])
    hold = Hold(id=uuid.uuid4(), tenant_id="t1", debit_account_id=customer.id, credit_account_id=transit.id,
                currency="EUR", amount=amount, expires_at=expires_at, payment_id="p1")
    transaction = post(book, hold.placement_legs(), kind=TransactionKind.HOLD_PLACED, hold_id=hold.id)
    hold.placed(transaction)
    return book, hold, customer


@given(amount=st.integers(1, 1_000), posted=st.one_of(st.none(), st.integers(1, 1_000)))
def test_a_hold_reserves_then_posts_at_most_its_amount(amount, posted):
    book, hold, customer = placed_hold(amount)
    state = book.accounts[customer.id]
    assert state.totals.available(state.normal_balance) == 1_000 - amount
    assert state.totals.posted(state.normal_balance) == 1_000
    if posted is not None and posted > amount:
        with pytest.raises(AmountExceedsHold):
            hold.posting_legs(amount=posted, now=T0)
        return
    transaction = post(book, hold.posting_legs(amount=posted, now=T0), kind=TransactionKind.HOLD_POSTED,
                       hold_id=hold.id)
    hold.posted(transaction)
    state = book.accounts[customer.id]
    spent = amount if posted is None else posted
    assert hold.status is HoldStatus.POSTED and hold.amount_posted == spent
    assert state.totals.posted(state.normal_balance) == state.totals.available(state.normal_balance) == 1_000 - spent
    assert state.totals.pending_debits == 0
    with pytest.raises(HoldNotPending):
        hold.voiding_legs()
    with pytest.raises(HoldNotPending):
        hold.posting_legs(amount=None, now=T0)
    assert [e.type for e in hold.events] == ["ledger.hold.placed.v1", "ledger.hold.posted.v1"]


def test_a_voided_hold_frees_everything_and_an_expired_one_cannot_post():
    book, hold, customer = placed_hold(300, expires_at=T0 + timedelta(minutes=1))
    with pytest.raises(HoldExpired):
        hold.posting_legs(amount=None, now=T0 + timedelta(minutes=1))
    transaction = post(book, hold.voiding_legs(), kind=TransactionKind.HOLD_VOIDED, hold_id=hold.id)
    hold.voided(transaction, reason="expired", expired=True)
    state = book.accounts[customer.id]
    assert hold.status is HoldStatus.EXPIRED and state.totals.available(state.normal_balance) == 1_000
    with pytest.raises(NotReversible):
        reversal_legs(transaction)


# ── the hash ───────────────────────────────────────────────────────────────────────


def test_the_hash_covers_content_entries_and_predecessors():
    a, b = account(allow_negative=True), account()
    transaction = post(Book([a, b], now=T0), [Leg(a.id, Direction.DEBIT, 10), Leg(b.id, Direction.CREDIT, 10)],
                       description="rent", metadata={"k": "v"})
    fields = dict(id=transaction.id, tenant_id="t1", kind=transaction.kind, posted_at=transaction.posted_at,
                  entries=transaction.entries, external_id=None, description="rent", metadata={"k": "v"},
                  reverses_id=None, hold_id=None, payment_id=None,
                  previous={a.id: a.head_hash, b.id: b.head_hash})
    assert transaction_hash(**fields) == transaction.hash
    changes = [{"description": "Rent"}, {"metadata": {"k": "w"}}, {"posted_at": T0 + timedelta(microseconds=1)},
               {"entries": transaction.entries[:1]}, {"previous": {a.id: b.head_hash, b.id: b.head_hash}},
               {"tenant_id": "t2"}, {"payment_id": "p"}]
    for change in changes:
        assert transaction_hash(**{**fields, **change}) != transaction.hash, change


def test_event_payloads_match_the_catalogue():
    book, hold, customer = placed_hold(50)
    transaction = post(book, hold.posting_legs(amount=20, now=T0), kind=TransactionKind.HOLD_POSTED, hold_id=hold.id,
                       payment_id="p1")
    hold.posted(transaction)
    events = [*hold.events, transaction_posted_event(transaction)]
    for event in events:
        EVENT_SCHEMAS[event.type].model_validate(event.payload)
    assert events[-1].payload["entries"] == [
        {"account_id": str(customer.id), "direction": "debit", "amount": 20, "currency": "EUR"},
        {"account_id": str(hold.credit_account_id), "direction": "credit", "amount": 20, "currency": "EUR"}]
