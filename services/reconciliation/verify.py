"""`verify(database_url)`: the reconciliation service's invariants, checked read-only
against its database; one line per violation (an empty list means all hold).

  1. no statement line is matched twice (only a one-to-many line has several payments,
     all from one run), and no payment or refund is matched to two lines
  2. every match names an existing statement line and an existing payment or refund
  3. every break names an existing statement, line (when it has one) and payment,
     refund or ledger posting (when it has one)
  4. projections equal their rebuild: the ledger totals equal the sum of the postings,
     each statement's line count equals its stored lines, and every break's status and
     resolution equal what its events in the log say (break.opened / break.resolved)
  5. every completed run recorded reconciliation.run.completed, every statement
     reconciliation.statement.imported

It runs in one REPEATABLE READ, READ ONLY transaction: one consistent moment, no writes.
"""

from __future__ import annotations

import asyncpg

from shared.db import plain_url

LIMIT = 20  # violations listed per check; the count says how many there are


async def verify(database_url: str) -> list[str]:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            problems: list[str] = []
            for check in (_lines_matched_once, _matches_reference_rows, _breaks_reference_rows,
                          _ledger_totals_rebuild, _statement_line_counts, _breaks_match_their_events,
                          _events_recorded):
                problems += await check(conn)
            return problems
    finally:
        await conn.close()


async def _listed(conn: asyncpg.Connection, sql: str, describe) -> list[str]:
    rows = await conn.fetch(f"{sql} LIMIT {LIMIT + 1}")
    found = [describe(row) for row in rows[:LIMIT]]
    if len(rows) > LIMIT:
        found.append("... and more of the same")
    return found


async def _lines_matched_once(conn: asyncpg.Connection) -> list[str]:
    lines = await _listed(conn, """
        SELECT statement_id, line_no, count(*) AS n FROM matches GROUP BY statement_id, line_no
        HAVING count(*) > 1 AND (NOT bool_and(rule = 'one_to_many') OR count(DISTINCT run_id) > 1)""",
        lambda r: f"statement {r['statement_id']} line {r['line_no']} is matched {r['n']} times")
    targets = await _listed(conn, """
        SELECT tenant_id, target_id, count(*) AS n FROM matches GROUP BY tenant_id, target_id HAVING count(*) > 1""",
        lambda r: f"payment/refund {r['target_id']} is matched to {r['n']} statement lines")
    return lines + targets


async def _matches_reference_rows(conn: asyncpg.Connection) -> list[str]:
    return await _listed(conn, """
        SELECT m.statement_id, m.line_no, m.target_id,
               l.line_no IS NULL AS no_line,
               (p.payment_id IS NULL AND r.refund_id IS NULL) AS no_target
        FROM matches m
        JOIN statements s ON s.id = m.statement_id
        LEFT JOIN statement_lines l ON l.received_on = s.received_on AND l.statement_id = m.statement_id
                                   AND l.line_no = m.line_no
        LEFT JOIN rm_payments p ON p.tenant_id = m.tenant_id AND p.payment_id = m.target_id
        LEFT JOIN rm_refunds r ON r.tenant_id = m.tenant_id AND r.refund_id = m.target_id
        WHERE l.line_no IS NULL OR (p.payment_id IS NULL AND r.refund_id IS NULL)""",
        lambda r: f"match of statement {r['statement_id']} line {r['line_no']} with {r['target_id']} names "
                  + ("a missing line" if r["no_line"] else "no known payment or refund"))


async def _breaks_reference_rows(conn: asyncpg.Connection) -> list[str]:
    return await _listed(conn, """
        SELECT b.id, b.type, s.id IS NULL AS no_statement,
               (b.line_no IS NOT NULL AND l.line_no IS NULL) AS no_line,
               (b.target_id IS NOT NULL AND p.payment_id IS NULL AND r.refund_id IS NULL AND g.payment_id IS NULL)
                   AS no_target
        FROM breaks b
        LEFT JOIN statements s ON s.id = b.statement_id AND s.tenant_id = b.tenant_id
        LEFT JOIN statement_lines l ON l.received_on = s.received_on AND l.statement_id = b.statement_id
                                   AND l.line_no = b.line_no
        LEFT JOIN rm_payments p ON p.tenant_id = b.tenant_id AND p.payment_id = b.target_id
        LEFT JOIN rm_refunds r ON r.tenant_id = b.tenant_id AND r.refund_id = b.target_id
        LEFT JOIN rm_ledger_totals g ON g.tenant_id = b.tenant_id AND g.payment_id = b.target_id
        WHERE s.id IS NULL OR (b.line_no IS NOT NULL AND l.line_no IS NULL)
           OR (b.target_id IS NOT NULL AND p.payment_id IS NULL AND r.refund_id IS NULL AND g.payment_id IS NULL)""",
        lambda r: f"break {r['id']} ({r['type']}) names "
                  + ("a missing statement" if r["no_statement"] else "a missing line" if r["no_line"]
                     else "a payment no source knows"))


async def _ledger_totals_rebuild(conn: asyncpg.Connection) -> list[str]:
    return await _listed(conn, """
        WITH rebuilt AS (
            SELECT DISTINCT ON (tenant_id, payment_id) tenant_id, payment_id, currency AS first_currency
            FROM rm_ledger_postings ORDER BY tenant_id, payment_id, posted_at, transaction_id
        ), sums AS (
            SELECT p.tenant_id, p.payment_id, count(*) AS postings,
                   count(*) FILTER (WHERE p.kind = 'reversal') AS reversals,
                   sum(p.amount) FILTER (WHERE p.currency = t.currency) AS amount,
                   bool_or(p.currency <> t.currency) AS mixed, min((p.posted_at AT TIME ZONE 'UTC')::date) AS value_date
            FROM rm_ledger_postings p JOIN rm_ledger_totals t USING (tenant_id, payment_id)
            GROUP BY p.tenant_id, p.payment_id
        )
        SELECT t.tenant_id, t.payment_id FROM rm_ledger_totals t
        LEFT JOIN sums s USING (tenant_id, payment_id)
        WHERE s.payment_id IS NULL OR s.postings <> t.postings OR s.reversals <> t.reversals
           OR COALESCE(s.amount, 0) <> t.amount OR s.mixed <> (t.other_currency IS NOT NULL)
           OR s.value_date <> t.value_date
        UNION ALL
        SELECT r.tenant_id, r.payment_id FROM rebuilt r
        WHERE NOT EXISTS (SELECT 1 FROM rm_ledger_totals t WHERE t.tenant_id = r.tenant_id
                          AND t.payment_id = r.payment_id)""",
        lambda r: f"ledger totals of payment {r['payment_id']} differ from the sum of its postings")


async def _statement_line_counts(conn: asyncpg.Connection) -> list[str]:
    return await _listed(conn, """
        SELECT s.id, s.line_count, count(l.line_no) AS stored
        FROM statements s
        LEFT JOIN statement_lines l ON l.received_on = s.received_on AND l.statement_id = s.id
        GROUP BY s.id, s.line_count HAVING count(l.line_no) <> s.line_count""",
        lambda r: f"statement {r['id']} says {r['line_count']} lines, {r['stored']} are stored")


async def _breaks_match_their_events(conn: asyncpg.Connection) -> list[str]:
    return await _listed(conn, """
        WITH last_event AS (
            SELECT DISTINCT ON (aggregate_id) aggregate_id, type, payload->>'resolution' AS resolution
            FROM events WHERE aggregate_type = 'break'
            ORDER BY aggregate_id, seq DESC
        )
        SELECT b.id, b.status, e.type AS event_type FROM breaks b
        LEFT JOIN last_event e ON e.aggregate_id = b.id::text
        WHERE e.type IS NULL
           OR (b.status = 'open') <> (e.type = 'reconciliation.break.opened.v1')
           OR (b.status = 'resolved' AND e.resolution IS DISTINCT FROM b.resolution)
        UNION ALL
        SELECT e.aggregate_id::uuid, NULL, e.type FROM last_event e
        WHERE NOT EXISTS (SELECT 1 FROM breaks b WHERE b.id::text = e.aggregate_id)""",
        lambda r: f"break {r['id']} is {r['status'] or 'absent'} but its last event is {r['event_type']}")


async def _events_recorded(conn: asyncpg.Connection) -> list[str]:
    return await _listed(conn, """
        SELECT 'run' AS kind, r.id FROM runs r WHERE r.status = 'completed' AND NOT EXISTS (
            SELECT 1 FROM events e WHERE e.aggregate_type = 'run' AND e.aggregate_id = r.id::text
              AND e.type = 'reconciliation.run.completed.v1')
        UNION ALL
        SELECT 'statement', s.id FROM statements s WHERE NOT EXISTS (
            SELECT 1 FROM events e WHERE e.aggregate_type = 'statement' AND e.aggregate_id = s.id::text
              AND e.type = 'reconciliation.statement.imported.v1')""",
        lambda r: f"{r['kind']} {r['id']} has no event recording it")
