"""`verify(database_url)`: check the ledger's invariants and name every violation.

Read-only, in one REPEATABLE READ snapshot, so a ledger being written to is judged as
of one instant. It trusts nothing it can recompute:

    journal      every transaction has ≥ 2 entries and balances per currency and layer;
                 posted money sums to zero per currency over all accounts
    entries      versions run 1, 2, 3… per account, times never go back, each running
                 total = previous + the entry, entries match their account's tenant and
                 currency, non-negative accounts never end a transaction below zero
    hash chain   each transaction's stored hash = sha256(its content, the stored hashes
                 of its accounts' previous transactions); each balance row's head is the
                 hash of the account's last transaction (or its genesis)
    projections  balances = a rebuild from the entries (sums, not the running columns);
                 holds = a rebuild from the hold_* journal transactions (one placement,
                 at most one resolution); pending totals = the pending holds; payment
                 reservations agree with the holds
    event log    every journal fact has its event (transaction.posted, hold.*)

It never writes, and it never stops at the first problem: it returns them all (up to
`MAX_PER_CHECK` per check, then a count), each with the ids needed to investigate.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import orjson

from services.ledger.domain import (
    Direction, Entry, EntryKind, Totals, TransactionKind, genesis_hash, transaction_hash,
)
from shared.db import plain_url

MAX_PER_CHECK = 50


class _Report:
    def __init__(self) -> None:
        self.violations: list[str] = []
        self._counts: dict[str, int] = {}

    def add(self, check: str, message: str) -> None:
        count = self._counts.get(check, 0) + 1
        self._counts[check] = count
        if count <= MAX_PER_CHECK:
            self.violations.append(message)

    def finish(self) -> list[str]:
        for check, count in self._counts.items():
            if count > MAX_PER_CHECK:
                self.violations.append(f"{check}: {count - MAX_PER_CHECK} more violations not listed")
        return self.violations


async def verify(database_url: str) -> list[str]:
    """Human-readable invariant violations of the ledger at `database_url` (empty = sound)."""
    conn = await asyncpg.connect(plain_url(database_url), server_settings={"application_name": "ledger-verify"})
    report = _Report()
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await _check_journal(conn, report)
            await _check_running_balances(conn, report)
            accounts = await _check_projection(conn, report)
            await _check_hash_chain(conn, report, accounts)
            await _check_holds(conn, report)
            await _check_event_log(conn, report)
    finally:
        await conn.close()
    return report.finish()


async def _rows(conn: asyncpg.Connection, query: str, *args) -> AsyncIterator[asyncpg.Record]:
    async for row in conn.cursor(query, *args, prefetch=2000):
        yield row


# ── the journal ──────────────────────────────────────────────────────────────────────


async def _check_journal(conn: asyncpg.Connection, report: _Report) -> None:
    async for row in _rows(conn, """
        SELECT e.transaction_id, e.currency, e.kind,
               coalesce(sum(e.amount) FILTER (WHERE e.direction = 'debit'), 0) AS debits,
               coalesce(sum(e.amount) FILTER (WHERE e.direction = 'credit'), 0) AS credits
        FROM entries e GROUP BY 1, 2, 3
        HAVING coalesce(sum(e.amount) FILTER (WHERE e.direction = 'debit'), 0)
            <> coalesce(sum(e.amount) FILTER (WHERE e.direction = 'credit'), 0)
        ORDER BY 1"""):
        report.add("unbalanced", f"transaction {row['transaction_id']}: does not balance in {row['currency']} "
                                 f"({row['kind']} layer): debits {row['debits']}, credits {row['credits']}")
    async for row in _rows(conn, """
        SELECT t.id, count(e.transaction_id) AS entries FROM transactions t
        LEFT JOIN entries e ON e.transaction_id = t.id GROUP BY t.id HAVING count(e.transaction_id) < 2"""):
        report.add("too_few_entries", f"transaction {row['id']}: has {row['entries']} entries (at least 2)")
    async for row in _rows(conn, """
        SELECT DISTINCT e.transaction_id FROM entries e
        LEFT JOIN transactions t ON t.id = e.transaction_id AND t.tenant_id = e.tenant_id
                                AND t.posted_at = e.posted_at
        WHERE t.id IS NULL"""):
        report.add("orphan_entries", f"transaction {row['transaction_id']}: entries without a matching transaction "
                                     "row (same id, tenant and posted_at)")
    async for row in _rows(conn, """
        SELECT e.transaction_id, e.entry_index, e.account_id FROM entries e
        LEFT JOIN accounts a ON a.id = e.account_id AND a.tenant_id = e.tenant_id AND a.currency = e.currency
        WHERE a.id IS NULL"""):
        report.add("foreign_entries", f"transaction {row['transaction_id']} entry {row['entry_index']}: account "
                                      f"{row['account_id']} does not exist in that tenant and currency")
    async for row in _rows(conn, """
        SELECT currency, sum(posted_debits) AS debits, sum(posted_credits) AS credits FROM balances
        GROUP BY currency HAVING sum(posted_debits) <> sum(posted_credits)"""):
        report.add("global_sum", f"currency {row['currency']}: posted debits {row['debits']} ≠ posted credits "
                                 f"{row['credits']} over all accounts (the sum over all accounts must be zero)")


# ── running balances ─────────────────────────────────────────────────────────────────


async def _check_running_balances(conn: asyncpg.Connection, report: _Report) -> None:
    """One ordered pass over each account's entries (the unique version index), in SQL."""
    async for row in _rows(conn, """
        WITH w AS (
            SELECT e.*, a.normal_balance, a.allow_negative,
                   lag(e.account_version, 1, 0::bigint) OVER acct AS prev_version,
                   lag(e.posted_at) OVER acct AS prev_posted_at,
                   lag(e.posted_debits, 1, 0::bigint) OVER acct AS p_pd,
                   lag(e.posted_credits, 1, 0::bigint) OVER acct AS p_pc,
                   lag(e.pending_debits, 1, 0::bigint) OVER acct AS p_qd,
                   lag(e.pending_credits, 1, 0::bigint) OVER acct AS p_qc,
                   lead(e.transaction_id) OVER acct AS next_transaction
            FROM entries e JOIN accounts a ON a.id = e.account_id
            WINDOW acct AS (PARTITION BY e.account_id ORDER BY e.account_version)
        )
        SELECT account_id, account_version, transaction_id, prev_version, prev_posted_at, posted_at,
               posted_debits, posted_credits, pending_debits, pending_credits,
               p_pd + CASE WHEN kind = 'posted' AND direction = 'debit' THEN amount ELSE 0 END AS want_pd,
               p_pc + CASE WHEN kind = 'posted' AND direction = 'credit' THEN amount ELSE 0 END AS want_pc,
               p_qd + CASE WHEN direction = 'debit' AND kind = 'pending' THEN amount
                           WHEN direction = 'debit' AND kind = 'released' THEN -amount ELSE 0 END AS want_qd,
               p_qc + CASE WHEN direction = 'credit' AND kind = 'pending' THEN amount
                           WHEN direction = 'credit' AND kind = 'released' THEN -amount ELSE 0 END AS want_qc,
               NOT allow_negative AND next_transaction IS DISTINCT FROM transaction_id
                 AND CASE normal_balance WHEN 'credit' THEN posted_credits - posted_debits - pending_debits
                                         ELSE posted_debits - posted_credits - pending_credits END < 0 AS overdrawn
        FROM w
        WHERE account_version <> prev_version + 1 OR posted_at < prev_posted_at
           OR posted_debits <> p_pd + CASE WHEN kind = 'posted' AND direction = 'debit' THEN amount ELSE 0 END
           OR posted_credits <> p_pc + CASE WHEN kind = 'posted' AND direction = 'credit' THEN amount ELSE 0 END
           OR pending_debits <> p_qd + CASE WHEN direction = 'debit' AND kind = 'pending' THEN amount
                                            WHEN direction = 'debit' AND kind = 'released' THEN -amount ELSE 0 END
           OR pending_credits <> p_qc + CASE WHEN direction = 'credit' AND kind = 'pending' THEN amount
                                             WHEN direction = 'credit' AND kind = 'released' THEN -amount ELSE 0 END
           OR (NOT allow_negative AND next_transaction IS DISTINCT FROM transaction_id
               AND CASE normal_balance WHEN 'credit' THEN posted_credits - posted_debits - pending_debits
                                       ELSE posted_debits - posted_credits - pending_credits END < 0)
        ORDER BY account_id, account_version"""):
        where = f"account {row['account_id']} entry v{row['account_version']} (transaction {row['transaction_id']})"
        if row["account_version"] != row["prev_version"] + 1:
            report.add("versions", f"{where}: follows v{row['prev_version']} (versions must run 1, 2, 3…)")
        if row["prev_posted_at"] is not None and row["posted_at"] < row["prev_posted_at"]:
            report.add("time_order", f"{where}: posted_at {row['posted_at'].isoformat()} is before the previous "
                                     f"entry's {row['prev_posted_at'].isoformat()}")
        for column, want in (("posted_debits", "want_pd"), ("posted_credits", "want_pc"),
                             ("pending_debits", "want_qd"), ("pending_credits", "want_qc")):
            if row[column] != row[want]:
                report.add("running_balance", f"{where}: running {column} {row[column]} ≠ previous + entry = "
                                              f"{row[want]}")
        if row["overdrawn"]:
            report.add("overdrawn", f"{where}: a non-negative account ends the transaction below zero available")


# ── projections ──────────────────────────────────────────────────────────────────────


async def _check_projection(conn: asyncpg.Connection, report: _Report) -> dict[uuid.UUID, asyncpg.Record]:
    """Balances rebuilt from the entries' amounts (not their running columns), and the
    balance rows' copies of the account facts. Returns the accounts for the chain check."""
    accounts = {row["id"]: row for row in await conn.fetch(
        "SELECT id, tenant_id, currency, normal_balance, allow_negative FROM accounts")}
    async for row in _rows(conn, """
        WITH rebuilt AS (
            SELECT account_id, count(*) AS version,
                   sum(amount) FILTER (WHERE kind = 'posted' AND direction = 'debit') AS pd,
                   sum(amount) FILTER (WHERE kind = 'posted' AND direction = 'credit') AS pc,
                   sum(CASE kind WHEN 'pending' THEN amount WHEN 'released' THEN -amount END)
                       FILTER (WHERE direction = 'debit') AS qd,
                   sum(CASE kind WHEN 'pending' THEN amount WHEN 'released' THEN -amount END)
                       FILTER (WHERE direction = 'credit') AS qc,
                   max(posted_at) AS last_posted_at
            FROM entries GROUP BY account_id
        )
        SELECT a.id, b.account_id AS balance_row, a.tenant_id, a.currency, a.normal_balance, a.allow_negative,
               b.tenant_id AS b_tenant, b.currency AS b_currency, b.normal_balance AS b_normal,
               b.allow_negative AS b_allow_negative,
               b.version, b.posted_debits, b.posted_credits, b.pending_debits, b.pending_credits, b.last_posted_at,
               coalesce(r.version, 0) AS r_version, coalesce(r.pd, 0) AS r_pd, coalesce(r.pc, 0) AS r_pc,
               coalesce(r.qd, 0) AS r_qd, coalesce(r.qc, 0) AS r_qc, r.last_posted_at AS r_last_posted_at
        FROM accounts a
        LEFT JOIN balances b ON b.account_id = a.id
        LEFT JOIN rebuilt r ON r.account_id = a.id
        WHERE b.account_id IS NULL
           OR (b.tenant_id, b.currency, b.normal_balance, b.allow_negative)
              IS DISTINCT FROM (a.tenant_id, a.currency, a.normal_balance, a.allow_negative)
           OR (b.version, b.posted_debits, b.posted_credits, b.pending_debits, b.pending_credits)
              IS DISTINCT FROM (coalesce(r.version, 0), coalesce(r.pd, 0), coalesce(r.pc, 0), coalesce(r.qd, 0),
                                coalesce(r.qc, 0))
           OR b.last_posted_at IS DISTINCT FROM r.last_posted_at
        ORDER BY a.id"""):
        where = f"account {row['id']}"
        if row["balance_row"] is None:
            report.add("projection", f"{where}: has no balance row")
            continue
        for mine, theirs in (("b_tenant", "tenant_id"), ("b_currency", "currency"), ("b_normal", "normal_balance"),
                             ("b_allow_negative", "allow_negative")):
            if row[mine] != row[theirs]:
                report.add("projection", f"{where}: balance row says {theirs} {row[mine]!r}, the account "
                                         f"{row[theirs]!r}")
        for column, rebuilt in (("version", "r_version"), ("posted_debits", "r_pd"), ("posted_credits", "r_pc"),
                                ("pending_debits", "r_qd"), ("pending_credits", "r_qc"),
                                ("last_posted_at", "r_last_posted_at")):
            if row[column] != row[rebuilt]:
                report.add("projection", f"{where}: balance row {column} {row[column]} ≠ rebuild from entries "
                                         f"{row[rebuilt]}")
    async for row in _rows(conn, "SELECT b.account_id FROM balances b LEFT JOIN accounts a ON a.id = b.account_id "
                                 "WHERE a.id IS NULL"):
        report.add("projection", f"balance row {row['account_id']}: no such account")
    return accounts


# ── the hash chain ───────────────────────────────────────────────────────────────────


def _genesis(account: asyncpg.Record) -> bytes:
    return genesis_hash(account_id=account["id"], tenant_id=account["tenant_id"], currency=account["currency"],
                        normal_balance=account["normal_balance"], allow_negative=account["allow_negative"])


async def _check_hash_chain(conn: asyncpg.Connection, report: _Report,
                            accounts: dict[uuid.UUID, asyncpg.Record]) -> None:
    """Recompute every transaction's hash from its stored content and the stored hashes of
    its accounts' previous transactions: an edited row breaks its own hash; a row whose
    hash was also rewritten breaks its successors'; the last one breaks the head."""
    async for row in _rows(conn, """
        WITH w AS (
            SELECT e.*, lag(e.transaction_id) OVER (PARTITION BY e.account_id ORDER BY e.account_version) AS prev_tx
            FROM entries e
        ), per_transaction AS (
            SELECT w.transaction_id,
                   json_agg(json_build_array(w.entry_index, w.account_id, w.account_version, w.direction, w.kind,
                                             w.amount, w.currency, w.posted_debits, w.posted_credits,
                                             w.pending_debits, w.pending_credits) ORDER BY w.entry_index) AS entries,
                   json_agg(json_build_array(w.account_id, w.prev_tx, encode(p.hash, 'hex')))
                       FILTER (WHERE w.prev_tx IS DISTINCT FROM w.transaction_id) AS previous
            FROM w LEFT JOIN transactions p ON p.id = w.prev_tx AND w.prev_tx IS DISTINCT FROM w.transaction_id
            GROUP BY w.transaction_id
        )
        SELECT t.id, t.tenant_id, t.kind, t.external_id, t.description, t.metadata::text AS metadata, t.reverses_id,
               t.hold_id, t.payment_id, t.posted_at, t.hash, p.entries::text AS entries, p.previous::text AS previous
        FROM transactions t JOIN per_transaction p ON p.transaction_id = t.id"""):
        try:
            recomputed = _recompute(row, accounts)
        except (KeyError, ValueError, TypeError) as exc:
            report.add("hash_chain", f"transaction {row['id']}: cannot be recomputed ({type(exc).__name__}: {exc})")
            continue
        if recomputed != bytes(row["hash"]):
            report.add("hash_chain", f"transaction {row['id']}: stored hash {bytes(row['hash']).hex()[:16]}… ≠ "
                                     f"recomputed {recomputed.hex()[:16]}…: its content, or the hash of a previous "
                                     "transaction of one of its accounts, was altered")
    async for row in _rows(conn, """
        SELECT b.account_id, b.version, b.head_hash, t.id AS last_transaction, t.hash AS last_hash
        FROM balances b
        LEFT JOIN LATERAL (SELECT transaction_id FROM entries WHERE account_id = b.account_id
                           ORDER BY account_version DESC LIMIT 1) last ON true
        LEFT JOIN transactions t ON t.id = last.transaction_id"""):
        account = accounts.get(row["account_id"])
        if row["last_transaction"] is None:
            expected = _genesis(account) if account else None
        else:
            expected = bytes(row["last_hash"]) if row["last_hash"] is not None else None
        if expected is None or bytes(row["head_hash"]) != expected:
            report.add("hash_chain", f"account {row['account_id']}: head hash {bytes(row['head_hash']).hex()[:16]}… "
                                     f"is not the hash of its last transaction {row['last_transaction']} "
                                     "(or its genesis): the chain's end was cut or rewritten")


def _recompute(row: asyncpg.Record, accounts: dict[uuid.UUID, asyncpg.Record]) -> bytes:
    posted_at: datetime = row["posted_at"]
    entries = [
        Entry(row["id"], index, uuid.UUID(account), version, Direction(direction), EntryKind(kind), amount,
              currency, posted_at, Totals(pd, pc, qd, qc))
        for index, account, version, direction, kind, amount, currency, pd, pc, qd, qc in orjson.loads(row["entries"])
    ]
    previous: dict[uuid.UUID, bytes] = {}
    for account, prev_tx, prev_hash in orjson.loads(row["previous"] or "[]"):
        account_id = uuid.UUID(account)
        if prev_tx is None:
            previous[account_id] = _genesis(accounts[account_id])
        elif prev_hash is None:
            raise ValueError(f"the previous transaction {prev_tx} of account {account} is missing")
        else:
            previous[account_id] = bytes.fromhex(prev_hash)
    return transaction_hash(
        id=row["id"], tenant_id=row["tenant_id"], kind=TransactionKind(row["kind"]), posted_at=posted_at,
        entries=entries, external_id=row["external_id"], description=row["description"],
        metadata=orjson.loads(row["metadata"]), reverses_id=row["reverses_id"], hold_id=row["hold_id"],
        payment_id=row["payment_id"], previous=previous)


# ── holds and payment reservations ───────────────────────────────────────────────────


async def _check_holds(conn: asyncpg.Connection, report: _Report) -> None:
    """Rebuild each hold from its journal transactions and compare with its row."""
    async for row in _rows(conn, """
        WITH journal AS (
            SELECT t.hold_id,
                   count(DISTINCT t.id) FILTER (WHERE t.kind = 'hold_placed') AS placements,
                   count(DISTINCT t.id) FILTER (WHERE t.kind IN ('hold_posted', 'hold_voided')) AS resolutions,
                   min(t.id::text) FILTER (WHERE t.kind = 'hold_placed') AS placed_id,
                   min(t.id::text) FILTER (WHERE t.kind IN ('hold_posted', 'hold_voided')) AS resolved_id,
                   min(t.kind) FILTER (WHERE t.kind IN ('hold_posted', 'hold_voided')) AS resolution,
                   sum(e.amount) FILTER (WHERE e.kind = 'pending' AND e.direction = 'debit') AS pending_amount,
                   min(e.account_id::text) FILTER (WHERE e.kind = 'pending' AND e.direction = 'debit') AS debit_account,
                   min(e.account_id::text) FILTER (WHERE e.kind = 'pending' AND e.direction = 'credit')
                       AS credit_account,
                   sum(e.amount) FILTER (WHERE e.kind = 'released' AND e.direction = 'debit') AS released,
                   sum(e.amount) FILTER (WHERE e.kind = 'posted' AND e.direction = 'debit'
                                           AND t.kind = 'hold_posted') AS posted
            FROM transactions t JOIN entries e ON e.transaction_id = t.id
            WHERE t.hold_id IS NOT NULL
            GROUP BY t.hold_id
        )
        SELECT coalesce(h.id, j.hold_id) AS id, h.id IS NULL AS missing_row, h.status, h.amount, h.amount_posted,
               h.debit_account_id::text AS debit_account_id, h.credit_account_id::text AS credit_account_id,
               h.placed_transaction_id::text AS placed_transaction_id,
               h.resolved_transaction_id::text AS resolved_transaction_id,
               j.placements, j.resolutions, j.placed_id, j.resolved_id, j.resolution, j.pending_amount, j.debit_account,
               j.credit_account, j.released, j.posted
        FROM holds h FULL JOIN journal j ON j.hold_id = h.id
        ORDER BY 1"""):
        where = f"hold {row['id']}"
        if row["missing_row"]:
            report.add("holds", f"{where}: journal transactions name it but there is no hold row")
            continue
        placements, resolutions = row["placements"] or 0, row["resolutions"] or 0
        if placements != 1:
            report.add("holds", f"{where}: placed {placements} times in the journal (exactly once expected)")
        if resolutions > 1:
            report.add("holds", f"{where}: resolved {resolutions} times (posted or voided twice)")
        status = row["status"]
        expected_resolution = {"pending": None, "posted": "hold_posted", "voided": "hold_voided",
                               "expired": "hold_voided"}[status]
        if (row["resolution"] if resolutions else None) != expected_resolution:
            report.add("holds", f"{where}: row says {status} but the journal says "
                                f"{row['resolution'] if resolutions else 'pending'}")
        if placements == 1 and (row["pending_amount"], row["debit_account"], row["credit_account"],
                                row["placed_id"]) != (row["amount"], row["debit_account_id"],
                                                      row["credit_account_id"], row["placed_transaction_id"]):
            report.add("holds", f"{where}: row (amount {row['amount']}, {row['debit_account_id']} → "
                                f"{row['credit_account_id']}) ≠ its placement in the journal "
                                f"(amount {row['pending_amount']}, {row['debit_account']} → {row['credit_account']})")
        if resolutions == 1:
            if row["released"] != row["amount"]:
                report.add("holds", f"{where}: released {row['released']} of {row['amount']}")
            if row["resolved_id"] != row["resolved_transaction_id"]:
                report.add("holds", f"{where}: row names resolution {row['resolved_transaction_id']}, the journal "
                                    f"{row['resolved_id']}")
            if (row["posted"] or 0) != row["amount_posted"]:
                report.add("holds", f"{where}: row says {row['amount_posted']} posted, "
                                    f"the journal {row['posted'] or 0}")
    async for row in _rows(conn, """
        WITH held AS (
            SELECT debit_account_id AS account_id, sum(amount) AS debits, 0 AS credits FROM holds
            WHERE status = 'pending' GROUP BY 1
            UNION ALL
            SELECT credit_account_id, 0, sum(amount) FROM holds WHERE status = 'pending' GROUP BY 1
        ), by_account AS (SELECT account_id, sum(debits) AS debits, sum(credits) AS credits FROM held GROUP BY 1)
        SELECT b.account_id, b.pending_debits, b.pending_credits, coalesce(h.debits, 0) AS held_debits,
               coalesce(h.credits, 0) AS held_credits
        FROM balances b LEFT JOIN by_account h ON h.account_id = b.account_id
        WHERE (b.pending_debits, b.pending_credits) <> (coalesce(h.debits, 0), coalesce(h.credits, 0))"""):
        report.add("holds", f"account {row['account_id']}: pending debits/credits {row['pending_debits']}/"
                            f"{row['pending_credits']} ≠ its pending holds {row['held_debits']}/{row['held_credits']}")
    async for row in _rows(conn, """
        SELECT coalesce(r.payment_id, h.payment_id) AS payment_id, coalesce(r.tenant_id, h.tenant_id) AS tenant_id,
               r.outcome, r.hold_id AS reserved_hold, h.id AS hold_id
        FROM payment_reservations r
        FULL JOIN (SELECT id, tenant_id, payment_id FROM holds WHERE payment_id IS NOT NULL) h
               ON h.tenant_id = r.tenant_id AND h.payment_id = r.payment_id
        WHERE (h.id IS NULL AND r.outcome = 'placed') OR (h.id IS NOT NULL AND r.payment_id IS NULL)
           OR (h.id IS NOT NULL AND r.hold_id IS DISTINCT FROM h.id)"""):
        report.add("reservations", f"payment {row['payment_id']} (tenant {row['tenant_id']}): reservation "
                                   f"{row['outcome']} names hold {row['reserved_hold']}, holds say {row['hold_id']}")
    # A refund gives back at most what the payment's settlement posted, and each refund
    # transaction is one refund row (the row is what keeps a refund from posting twice).
    async for row in _rows(conn, """
        SELECT coalesce(r.tenant_id, t.tenant_id) AS tenant_id, coalesce(r.payment_id, t.payment_id) AS payment_id,
               r.refund_id, t.id AS transaction_id, t.payment_id AS transaction_payment
        FROM payment_refunds r
        FULL JOIN (SELECT id, tenant_id, payment_id FROM transactions WHERE kind = 'payment_refund') t
               ON t.id = r.transaction_id
        WHERE r.refund_id IS NULL OR t.id IS NULL OR t.payment_id IS DISTINCT FROM r.payment_id"""):
        report.add("refunds", f"payment {row['payment_id']} (tenant {row['tenant_id']}): refund {row['refund_id']} "
                              f"and refund transaction {row['transaction_id']} do not match one to one")
    async for row in _rows(conn, """
        SELECT r.tenant_id, r.payment_id, sum(r.amount) AS refunded, max(h.amount_posted) AS posted
        FROM payment_refunds r
        LEFT JOIN holds h ON h.tenant_id = r.tenant_id AND h.payment_id = r.payment_id AND h.status = 'posted'
        GROUP BY 1, 2 HAVING sum(r.amount) > coalesce(max(h.amount_posted), 0)"""):
        report.add("refunds", f"payment {row['payment_id']} (tenant {row['tenant_id']}): refunded "
                              f"{row['refunded']}, but its settlement posted {row['posted'] or 0}")


# ── the event log ────────────────────────────────────────────────────────────────────


async def _check_event_log(conn: asyncpg.Connection, report: _Report) -> None:
    """Every journal fact was announced exactly once (the outbox row is written with it)."""
    async for row in _rows(conn, """
        WITH expected AS (
            SELECT DISTINCT t.id::text AS aggregate_id, 'transaction' AS aggregate_type,
                   'ledger.transaction.posted.v1' AS type
            FROM transactions t JOIN entries e ON e.transaction_id = t.id AND e.kind = 'posted'
            UNION ALL
            SELECT hold_id::text, 'hold', CASE kind WHEN 'hold_placed' THEN 'ledger.hold.placed.v1'
                                                    WHEN 'hold_posted' THEN 'ledger.hold.posted.v1'
                                                    ELSE 'ledger.hold.voided.v1' END
            FROM transactions WHERE hold_id IS NOT NULL
        ), found AS (
            SELECT aggregate_type, aggregate_id, type, count(*) AS n FROM events
            WHERE type IN ('ledger.transaction.posted.v1', 'ledger.hold.placed.v1', 'ledger.hold.posted.v1',
                           'ledger.hold.voided.v1')
            GROUP BY 1, 2, 3
        )
        SELECT coalesce(x.aggregate_type, f.aggregate_type) AS aggregate_type,
               coalesce(x.aggregate_id, f.aggregate_id) AS aggregate_id, coalesce(x.type, f.type) AS type,
               coalesce(f.n, 0) AS n, x.type IS NULL AS unexpected
        FROM expected x FULL JOIN found f USING (aggregate_type, aggregate_id, type)
        WHERE coalesce(f.n, 0) <> 1 OR x.type IS NULL"""):
        subject = f"{row['aggregate_type']} {row['aggregate_id']}"
        if row["unexpected"]:
            report.add("event_log", f"{subject}: event {row['type']} has no journal fact behind it")
        else:
            report.add("event_log", f"{subject}: {row['n']} {row['type']} events in the log (exactly 1 expected)")
