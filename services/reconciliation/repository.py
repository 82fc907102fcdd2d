"""SQL of the reconciliation service (the run engine's passes live in `matching.py`).

Every query names the tenant; another tenant's statement, run or break is simply not
found. Read-model writes go straight to the asyncpg driver connection of the consumer's
transaction (one prepared statement per event: the read model must keep up with every
payment and posting of every tenant); everything else goes through SQLAlchemy.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# ── read model ─────────────────────────────────────────────────────────────────────

_UPSERT_PAYMENT = """
INSERT INTO rm_payments AS p (tenant_id, payment_id, amount, currency, debit_account_id, status, status_seq,
                              value_date, refunded_amount)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (tenant_id, payment_id) DO UPDATE SET
    amount = COALESCE(p.amount, EXCLUDED.amount),
    currency = COALESCE(p.currency, EXCLUDED.currency),
    debit_account_id = COALESCE(p.debit_account_id, EXCLUDED.debit_account_id),
    value_date = COALESCE(p.value_date, EXCLUDED.value_date),
    refunded_amount = GREATEST(p.refunded_amount, EXCLUDED.refunded_amount),
    -- monotonic: only a later event (by the producer's log seq) moves the status
    status = CASE WHEN EXCLUDED.status_seq > p.status_seq THEN EXCLUDED.status ELSE p.status END,
    status_seq = GREATEST(p.status_seq, EXCLUDED.status_seq),
    updated_at = clock_timestamp()
"""

_UPSERT_REFUNDED_PAYMENT = f"""
WITH refund AS (
    INSERT INTO rm_refunds (tenant_id, refund_id, payment_id, amount, currency, value_date)
    VALUES ($1, $10, $2, $11, $4, $12)
    ON CONFLICT DO NOTHING
)
{_UPSERT_PAYMENT}
"""

_POST_LEDGER = """
WITH posting AS (
    INSERT INTO rm_ledger_postings (tenant_id, transaction_id, currency, payment_id, amount, kind, posted_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, payment_id, currency, amount, kind, posted_at
)
INSERT INTO rm_ledger_totals AS g (tenant_id, payment_id, currency, amount, postings, reversals, value_date)
SELECT tenant_id, payment_id, currency, amount, 1, (kind = 'reversal')::int, (posted_at AT TIME ZONE 'UTC')::date
FROM posting
ON CONFLICT (tenant_id, payment_id) DO UPDATE SET
    amount = g.amount + CASE WHEN EXCLUDED.currency = g.currency THEN EXCLUDED.amount ELSE 0 END,
    other_currency = CASE WHEN EXCLUDED.currency <> g.currency THEN EXCLUDED.currency ELSE g.other_currency END,
    postings = g.postings + 1,
    reversals = g.reversals + EXCLUDED.reversals,
    value_date = LEAST(g.value_date, EXCLUDED.value_date)
"""


class NotInTransaction(RuntimeError):
    """A read-model write outside the consumer's transaction would escape its inbox row."""


_DRIVER = "reconciliation.driver_connection"


async def driver_connection(session: AsyncSession) -> asyncpg.Connection:
    """The asyncpg connection under the session's transaction (kept for the session's life:
    looking it up through SQLAlchemy costs more than the statement it then runs)."""
    driver = session.info.get(_DRIVER)
    if driver is not None and driver.is_in_transaction():
        return driver
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver = session.info[_DRIVER] = raw.driver_connection
    if not driver.is_in_transaction():
        # SQLAlchemy begins the driver's transaction lazily, on its first statement.
        await connection.exec_driver_sql("SELECT 1")
    if not driver.is_in_transaction():
        raise NotInTransaction("read-model writes must run inside the caller's unit of work")
    return driver


@dataclass(frozen=True)
class PaymentFact:
    tenant_id: str
    payment_id: uuid.UUID
    amount: int | None
    currency: str | None
    debit_account_id: str | None
    status: str
    status_seq: int
    value_date: date | None
    refunded_amount: int
    refund_id: uuid.UUID | None = None
    refund_amount: int | None = None
    refund_value_date: date | None = None


async def apply_payment_fact(session: AsyncSession, fact: PaymentFact) -> None:
    driver = await driver_connection(session)
    args = (fact.tenant_id, fact.payment_id, fact.amount, fact.currency, fact.debit_account_id, fact.status,
            fact.status_seq, fact.value_date, fact.refunded_amount)
    if fact.refund_id is None:
        await driver.execute(_UPSERT_PAYMENT, *args)
    else:
        await driver.execute(_UPSERT_REFUNDED_PAYMENT, *args, fact.refund_id, fact.refund_amount,
                             fact.refund_value_date)


@dataclass(frozen=True)
class LedgerPosting:
    tenant_id: str
    transaction_id: uuid.UUID
    currency: str
    payment_id: uuid.UUID
    amount: int  # signed
    kind: str
    posted_at: datetime


async def apply_ledger_posting(session: AsyncSession, posting: LedgerPosting) -> None:
    driver = await driver_connection(session)
    await driver.execute(_POST_LEDGER, posting.tenant_id, posting.transaction_id, posting.currency,
                         posting.payment_id, posting.amount, posting.kind, posting.posted_at)


# ── statements ───────────────────────────────────────────────────────────────────────

STATEMENT_LINE_COLUMNS = ("tenant_id", "statement_id", "received_on", "line_no", "entry_no", "source_line",
                          "value_date", "booking_date", "direction", "amount", "entry_amount", "currency",
                          "reference", "ref_uuid", "bank_ref")

_STATEMENT_FIELDS = ("id, tenant_id, format, encode(content_sha256, 'hex') AS sha256, size_bytes, line_count, "
                     "skipped_count, period_start, period_end, received_on, account, currencies, created_by, "
                     "created_at")


@dataclass(frozen=True)
class StatementRow:
    id: uuid.UUID
    tenant_id: str
    format: str
    sha256: str
    size_bytes: int
    line_count: int
    skipped_count: int
    period_start: date
    period_end: date
    received_on: date
    account: str | None
    currencies: list[str]
    created_by: str
    created_at: datetime


async def ensure_statement_partition(session: AsyncSession, *, day: date) -> None:
    await session.execute(text("SELECT ensure_statement_partition(:day)"), {"day": day})


async def analyze_statement_lines(session: AsyncSession, *, day: date) -> None:
    await session.execute(text("SELECT analyze_statement_partition(:day)"), {"day": day})


async def statement_by_hash(session: AsyncSession, *, tenant_id: str, sha256: bytes) -> StatementRow | None:
    row = (await session.execute(text(
        f"SELECT {_STATEMENT_FIELDS} FROM statements WHERE tenant_id = :tenant AND content_sha256 = :sha"),
        {"tenant": tenant_id, "sha": sha256})).mappings().one_or_none()
    return StatementRow(**row) if row else None


async def get_statement(session: AsyncSession, *, tenant_id: str, statement_id: uuid.UUID) -> StatementRow | None:
    row = (await session.execute(text(
        f"SELECT {_STATEMENT_FIELDS} FROM statements WHERE tenant_id = :tenant AND id = :id"),
        {"tenant": tenant_id, "id": statement_id})).mappings().one_or_none()
    return StatementRow(**row) if row else None


async def copy_statement_lines(session: AsyncSession, source: AsyncIterator[bytes]) -> None:
    """COPY the already-encoded lines (text format) in the session's transaction."""
    driver = await driver_connection(session)
    await driver.copy_to_table("statement_lines", source=source, columns=list(STATEMENT_LINE_COLUMNS),
                               format="text")


async def insert_statement(session: AsyncSession, *, statement_id: uuid.UUID, tenant_id: str, fmt: str,
                           sha256: bytes, size_bytes: int, line_count: int, skipped_count: int, period_start: date,
                           period_end: date, received_on: date, account: str | None, currencies: list[str],
                           created_by: str) -> StatementRow:
    row = (await session.execute(text(f"""
        INSERT INTO statements (id, tenant_id, format, content_sha256, size_bytes, line_count, skipped_count,
                                period_start, period_end, received_on, account, currencies, created_by)
        VALUES (:id, :tenant, :format, :sha, :size, :lines, :skipped, :start, :end, :received, :account,
                :currencies, :created_by)
        RETURNING {_STATEMENT_FIELDS}"""),
        {"id": statement_id, "tenant": tenant_id, "format": fmt, "sha": sha256, "size": size_bytes,
         "lines": line_count, "skipped": skipped_count, "start": period_start, "end": period_end,
         "received": received_on, "account": account, "currencies": currencies,
         "created_by": created_by})).mappings().one()
    return StatementRow(**row)


# ── rules ────────────────────────────────────────────────────────────────────────────


async def get_rules(session: AsyncSession, *, tenant_id: str) -> tuple[dict[str, Any] | None, int]:
    row = (await session.execute(text("SELECT rules, version FROM reconciliation_rules WHERE tenant_id = :tenant"),
                                 {"tenant": tenant_id})).one_or_none()
    return (row.rules, row.version) if row else (None, 0)


async def put_rules(session: AsyncSession, *, tenant_id: str, rules: dict[str, Any], updated_by: str) -> int:
    return (await session.execute(text("""
        INSERT INTO reconciliation_rules (tenant_id, rules, version, updated_by)
        VALUES (:tenant, CAST(:rules AS jsonb), 1, :by)
        ON CONFLICT (tenant_id) DO UPDATE
            SET rules = EXCLUDED.rules, version = reconciliation_rules.version + 1, updated_by = EXCLUDED.updated_by,
                updated_at = clock_timestamp()
        RETURNING version"""), {"tenant": tenant_id, "rules": orjson.dumps(rules).decode(), "by": updated_by})
            ).scalar_one()


# ── runs ─────────────────────────────────────────────────────────────────────────────

_RUN_FIELDS = ("id, tenant_id, statement_id, status, stage, rules, lines, matched, breaks, breaks_opened, "
               "breaks_resolved, stats, error_code, attempts, requested_by, correlation_id, traceparent, created_at, "
               "started_at, completed_at")


@dataclass(frozen=True)
class RunRow:
    id: uuid.UUID
    tenant_id: str
    statement_id: uuid.UUID
    status: str
    stage: str | None
    rules: dict[str, Any]
    lines: int | None
    matched: int
    breaks: int
    breaks_opened: int
    breaks_resolved: int
    stats: dict[str, Any]
    error_code: str | None
    attempts: int
    requested_by: str
    correlation_id: str | None
    traceparent: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


def _run(row) -> RunRow | None:
    return RunRow(**row) if row else None


async def active_run(session: AsyncSession, *, tenant_id: str, statement_id: uuid.UUID) -> RunRow | None:
    return _run((await session.execute(text(
        f"SELECT {_RUN_FIELDS} FROM runs WHERE tenant_id = :tenant AND statement_id = :statement "
        "AND status IN ('queued', 'running')"), {"tenant": tenant_id, "statement": statement_id})
    ).mappings().one_or_none())


async def insert_run(session: AsyncSession, *, run_id: uuid.UUID, tenant_id: str, statement_id: uuid.UUID,
                     rules: dict[str, Any], requested_by: str, correlation_id: str | None,
                     traceparent: str | None) -> RunRow | None:
    """The new queued run, or None if the statement has an active run already."""
    return _run((await session.execute(text(f"""
        INSERT INTO runs (id, tenant_id, statement_id, status, rules, requested_by, correlation_id, traceparent)
        VALUES (:id, :tenant, :statement, 'queued', CAST(:rules AS jsonb), :by, :correlation, :traceparent)
        ON CONFLICT (tenant_id, statement_id) WHERE status IN ('queued', 'running') DO NOTHING
        RETURNING {_RUN_FIELDS}"""),
        {"id": run_id, "tenant": tenant_id, "statement": statement_id, "rules": orjson.dumps(rules).decode(),
         "by": requested_by, "correlation": correlation_id, "traceparent": traceparent})).mappings().one_or_none())


async def get_run(session: AsyncSession, *, tenant_id: str, run_id: uuid.UUID) -> RunRow | None:
    return _run((await session.execute(text(f"SELECT {_RUN_FIELDS} FROM runs WHERE tenant_id = :tenant AND id = :id"),
                                       {"tenant": tenant_id, "id": run_id})).mappings().one_or_none())


async def list_runs(session: AsyncSession, *, tenant_id: str, status: str | None,
                    before: tuple[datetime, uuid.UUID] | None, limit: int) -> list[RunRow]:
    """The tenant's runs, newest first (runs_by_statement leads with tenant_id; a tenant
    has a few runs a day, so the sort is over few rows)."""
    rows = (await session.execute(text(f"""
        SELECT {_RUN_FIELDS} FROM runs
        WHERE tenant_id = :tenant AND (CAST(:status AS text) IS NULL OR status = :status)
          AND (CAST(:before_at AS timestamptz) IS NULL OR (created_at, id) < (:before_at, CAST(:before_id AS uuid)))
        ORDER BY created_at DESC, id DESC LIMIT :limit"""),
        {"tenant": tenant_id, "status": status, "before_at": before[0] if before else None,
         "before_id": before[1] if before else None, "limit": limit})).mappings().all()
    return [RunRow(**row) for row in rows]


async def fail_exhausted_runs(session: AsyncSession, *, max_attempts: int) -> list[RunRow]:
    """Runs whose worker died `max_attempts` times: failed, not retried for ever."""
    rows = (await session.execute(text(f"""
        UPDATE runs SET status = 'failed', error_code = 'attempts_exhausted', completed_at = clock_timestamp(),
                        lease_until = NULL
        WHERE id IN (SELECT id FROM runs WHERE status = 'running' AND lease_until < clock_timestamp()
                     AND attempts >= :max FOR UPDATE SKIP LOCKED)
        RETURNING {_RUN_FIELDS}"""), {"max": max_attempts})).mappings().all()
    return [RunRow(**row) for row in rows]


async def claim_run(session: AsyncSession, *, lease_s: float) -> RunRow | None:
    """The oldest queued run (or one whose worker's lease ran out), now running and leased
    to this worker. SKIP LOCKED: replicas never wait on each other."""
    return _run((await session.execute(text(f"""
        UPDATE runs SET status = 'running', attempts = attempts + 1, stage = 'claimed',
                        started_at = COALESCE(started_at, clock_timestamp()),
                        lease_until = clock_timestamp() + make_interval(secs => :lease)
        WHERE id = (SELECT id FROM runs
                    WHERE status = 'queued' OR (status = 'running' AND lease_until < clock_timestamp())
                    ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1)
        RETURNING {_RUN_FIELDS}"""), {"lease": lease_s})).mappings().one_or_none())


async def requeue_run(session: AsyncSession, *, run_id: uuid.UUID) -> None:
    await session.execute(text(
        "UPDATE runs SET status = 'queued', stage = NULL, lease_until = NULL WHERE id = :id AND status = 'running'"),
        {"id": run_id})


async def record_progress(session: AsyncSession, *, run_id: uuid.UUID, stage: str, lease_s: float,
                          lines: int | None = None, matched: int | None = None) -> None:
    await session.execute(text("""
        UPDATE runs SET stage = :stage, lines = COALESCE(:lines, lines), matched = COALESCE(:matched, matched),
                        lease_until = clock_timestamp() + make_interval(secs => :lease)
        WHERE id = :id AND status = 'running'"""),
        {"id": run_id, "stage": stage, "lines": lines, "matched": matched, "lease": lease_s})


async def complete_run(session: AsyncSession, *, run_id: uuid.UUID, lines: int, matched: int, breaks: int,
                       breaks_opened: int, breaks_resolved: int, stats: dict[str, Any]) -> bool:
    result = await session.execute(text("""
        UPDATE runs SET status = 'completed', stage = 'done', lines = :lines, matched = :matched, breaks = :breaks,
                        breaks_opened = :opened, breaks_resolved = :resolved, stats = CAST(:stats AS jsonb),
                        completed_at = clock_timestamp(), lease_until = NULL
        WHERE id = :id AND status = 'running'"""),
        {"id": run_id, "lines": lines, "matched": matched, "breaks": breaks, "opened": breaks_opened,
         "resolved": breaks_resolved, "stats": orjson.dumps(stats).decode()})
    return result.rowcount == 1


async def fail_run(session: AsyncSession, *, run_id: uuid.UUID, error_code: str) -> RunRow | None:
    return _run((await session.execute(text(f"""
        UPDATE runs SET status = 'failed', error_code = :code, completed_at = clock_timestamp(), lease_until = NULL
        WHERE id = :id AND status = 'running'
        RETURNING {_RUN_FIELDS}"""), {"id": run_id, "code": error_code})).mappings().one_or_none())


# ── breaks and matches ───────────────────────────────────────────────────────────────

_BREAK_FIELDS = ("id, tenant_id, statement_id, run_id, last_run_id, type, status, source, amount, expected_amount, "
                 "currency, expected_currency, reference, target_id, payment_id, line_no, value_date, detail, "
                 "opened_at, resolved_at, resolved_by, resolution, resolution_reason")


@dataclass(frozen=True)
class BreakRow:
    id: uuid.UUID
    tenant_id: str
    statement_id: uuid.UUID
    run_id: uuid.UUID
    last_run_id: uuid.UUID
    type: str
    status: str
    source: str
    amount: int | None
    expected_amount: int | None
    currency: str | None
    expected_currency: str | None
    reference: str | None
    target_id: uuid.UUID | None
    payment_id: uuid.UUID | None
    line_no: int | None
    value_date: date | None
    detail: str
    opened_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None
    resolution: str | None
    resolution_reason: str | None


async def list_breaks(session: AsyncSession, *, tenant_id: str, run_id: uuid.UUID | None, status: str | None,
                      break_type: str | None, statement_id: uuid.UUID | None, after: tuple[datetime, uuid.UUID] | None,
                      limit: int) -> list[BreakRow]:
    clauses = ["tenant_id = :tenant"]
    params: dict[str, Any] = {"tenant": tenant_id, "limit": limit}
    if run_id is not None:
        clauses.append("(last_run_id = :run OR run_id = :run)")
        params["run"] = run_id
    if status is not None:
        clauses.append("status = :status")
        params["status"] = status
    if break_type is not None:
        clauses.append("type = :type")
        params["type"] = break_type
    if statement_id is not None:
        clauses.append("statement_id = :statement")
        params["statement"] = statement_id
    if after is not None:
        clauses.append("(opened_at, id) > (:after_at, :after_id)")
        params["after_at"], params["after_id"] = after
    rows = (await session.execute(text(
        f"SELECT {_BREAK_FIELDS} FROM breaks WHERE {' AND '.join(clauses)} ORDER BY opened_at, id LIMIT :limit"),
        params)).mappings().all()
    return [BreakRow(**row) for row in rows]


async def get_break(session: AsyncSession, *, tenant_id: str, break_id: uuid.UUID, lock: bool = False
                    ) -> BreakRow | None:
    row = (await session.execute(text(
        f"SELECT {_BREAK_FIELDS} FROM breaks WHERE tenant_id = :tenant AND id = :id" + (" FOR UPDATE" if lock else "")),
        {"tenant": tenant_id, "id": break_id})).mappings().one_or_none()
    return BreakRow(**row) if row else None


async def resolve_breaks(session: AsyncSession, *, tenant_id: str, break_ids: list[uuid.UUID], resolution: str,
                         reason: str, resolved_by: str) -> list[BreakRow]:
    rows = (await session.execute(text(f"""
        UPDATE breaks SET status = 'resolved', resolution = :resolution, resolution_reason = :reason,
                          resolved_by = :by, resolved_at = clock_timestamp()
        WHERE tenant_id = :tenant AND id = ANY(:ids) AND status = 'open'
        RETURNING {_BREAK_FIELDS}"""),
        {"tenant": tenant_id, "ids": break_ids, "resolution": resolution, "reason": reason, "by": resolved_by}
    )).mappings().all()
    return [BreakRow(**row) for row in rows]


async def open_breaks_touching(session: AsyncSession, *, tenant_id: str, statement_id: uuid.UUID, line_no: int,
                               target_id: uuid.UUID) -> list[uuid.UUID]:
    """Open breaks of a statement that a manual match of (line, target) explains."""
    rows = await session.execute(text("""
        SELECT id FROM breaks
        WHERE tenant_id = :tenant AND statement_id = :statement AND status = 'open' AND source <> 'ledger'
          AND (break_key = :line_key OR target_id = :target)
        FOR UPDATE"""), {"tenant": tenant_id, "statement": statement_id, "line_key": f"line:{line_no}",
                         "target": target_id})
    return [row.id for row in rows]


@dataclass(frozen=True)
class LineRow:
    line_no: int
    amount: int | None
    entry_amount: int
    currency: str
    direction: str
    value_date: date


async def get_line(session: AsyncSession, *, tenant_id: str, statement: StatementRow, line_no: int) -> LineRow | None:
    row = (await session.execute(text("""
        SELECT line_no, amount, entry_amount, currency, direction, value_date FROM statement_lines
        WHERE received_on = :received AND statement_id = :statement AND tenant_id = :tenant AND line_no = :line"""),
        {"received": statement.received_on, "statement": statement.id, "tenant": tenant_id, "line": line_no}
    )).mappings().one_or_none()
    return LineRow(**row) if row else None


def tenant_matching_lock_key(tenant_id: str) -> str:
    return f"reconciliation:run:{tenant_id}"


async def lock_tenant_matching(session: AsyncSession, *, tenant_id: str) -> None:
    """Runs and manual matches of one tenant take turns (transaction-scoped lock)."""
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                          {"key": tenant_matching_lock_key(tenant_id)})


async def target_matched(session: AsyncSession, *, tenant_id: str, target_id: uuid.UUID) -> bool:
    return (await session.execute(text(
        "SELECT EXISTS (SELECT 1 FROM matches WHERE tenant_id = :tenant AND target_id = :target)"),
        {"tenant": tenant_id, "target": target_id})).scalar_one()


async def line_matched(session: AsyncSession, *, statement_id: uuid.UUID, line_no: int) -> bool:
    return (await session.execute(text(
        "SELECT EXISTS (SELECT 1 FROM matches WHERE statement_id = :statement AND line_no = :line)"),
        {"statement": statement_id, "line": line_no})).scalar_one()


@dataclass(frozen=True)
class TargetRow:
    target_kind: str
    target_id: uuid.UUID
    payment_id: uuid.UUID
    amount: int | None
    currency: str | None
    status: str
    value_date: date | None
    ledger: str


async def get_target(session: AsyncSession, *, tenant_id: str, target_id: uuid.UUID) -> TargetRow | None:
    """The payment or refund with this id, with the ledger's word on it."""
    row = (await session.execute(text("""
        SELECT 'payment' AS target_kind, p.payment_id AS target_id, p.payment_id, p.amount, p.currency, p.status,
               p.value_date,
               CASE WHEN g.payment_id IS NULL THEN 'missing'
                    WHEN g.currency <> p.currency OR g.other_currency IS NOT NULL OR g.amount <> p.amount
                        THEN 'mismatch'
                    ELSE 'agrees' END AS ledger
        FROM rm_payments p
        LEFT JOIN rm_ledger_totals g ON g.tenant_id = p.tenant_id AND g.payment_id = p.payment_id
        WHERE p.tenant_id = :tenant AND p.payment_id = :id
        UNION ALL
        SELECT 'refund', r.refund_id, r.payment_id, r.amount, r.currency, 'refunded', r.value_date, 'not_applicable'
        FROM rm_refunds r WHERE r.tenant_id = :tenant AND r.refund_id = :id"""),
        {"tenant": tenant_id, "id": target_id})).mappings().first()
    return TargetRow(**row) if row else None


async def insert_manual_match(session: AsyncSession, *, tenant_id: str, statement_id: uuid.UUID, line_no: int,
                              target: TargetRow, amount_difference: int, date_difference: int, matched_by: str,
                              reason: str) -> None:
    await session.execute(text("""
        INSERT INTO matches (tenant_id, statement_id, line_no, target_kind, target_id, payment_id, rule, confidence,
                             amount_difference, date_difference, ledger, run_id, matched_by, reason)
        VALUES (:tenant, :statement, :line, :kind, :target, :payment, 'manual', 1.0, :amount_diff, :date_diff,
                :ledger, NULL, :by, :reason)"""),
        {"tenant": tenant_id, "statement": statement_id, "line": line_no, "kind": target.target_kind,
         "target": target.target_id, "payment": target.payment_id, "amount_diff": amount_difference,
         "date_diff": date_difference, "ledger": target.ledger, "by": matched_by, "reason": reason})
