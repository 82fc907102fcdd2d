"""The run engine: one statement reconciled against the read model of payments and the
ledger, in set-based SQL passes inside one transaction.

    statement lines ──keyed join (hash join on the reference as a uuid)──▶ w_keyed
        │  exact        reference + amount + currency (+ direction)
        │  tolerance    reference + amount within the tenant's drift + value date within the window
        │  entries      camt.053 entries whose TxDtls carry no amounts: Σ payments = entry amount
        │  duplicates   a second line for a payment already matched (here or in another statement)
        ▼
    matches (+ the ledger leg of each, checked in the same statement)
        │  one-to-many  an unreferenced line = Σ of the open payments of one value date
        │  fuzzy        only what is left: a reference a few edits from a payment id, amounts agreeing
        ▼
    breaks: whatever is left on any side, typed; upserted on (statement, type, key) so a
            re-run never duplicates one; open breaks a re-run no longer finds are cleared

Passes run in the tenant's priority order (exact first, always), every match records its
rule and confidence, and the whole run commits or nothing does: a crashed or failed run
leaves the previous results untouched. This module must never match a line twice, match
a payment twice (the unique index on matches enforces it), nor touch another tenant's rows.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.reconciliation import repository
from services.reconciliation.domain import SETTLED_STATUSES, MatchRule, Rules

ACTOR = "job:reconciliation-run"
Progress = Callable[..., Awaitable[None]]

_SETTLED = "(" + ", ".join(f"'{s}'" for s in SETTLED_STATUSES) + ")"


@dataclass(frozen=True)
class RunScope:
    run_id: uuid.UUID
    tenant_id: str
    statement_id: uuid.UUID
    received_on: date
    period_start: date
    period_end: date
    correlation_id: str | None
    traceparent: str | None
    format: str = "csv"
    lines: int = 0


@dataclass
class RunOutcome:
    lines: int = 0
    matched: int = 0  # lines reconciled three ways (two for refunds: see docs/reconciliation.md)
    breaks: int = 0  # open breaks of the statement after the run
    breaks_opened: int = 0
    breaks_resolved: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage, for operators

    def timed(self, stage: str, started: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - started, 3)
        return now


# The ledger's word on a payment: agrees, missing or mismatch (refunds: the read model does
# not take the ledger's refund postings yet, so their ledger leg is not applicable).
_LEDGER_STATE = """
CASE WHEN {kind} <> 'payment' THEN 'not_applicable'
     WHEN g.payment_id IS NULL THEN 'missing'
     WHEN g.currency <> {currency} OR g.other_currency IS NOT NULL OR g.amount <> {amount} THEN 'mismatch'
     ELSE 'agrees' END
"""

# ── 1. keyed pass: every line with the payment (or refund) its reference names ──────
# Outcome per line, by priority: exact < tolerance < grouped (entry-level) < mismatch.
_KEYED = text(f"""
CREATE TEMP TABLE w_keyed ON COMMIT DROP AS
WITH keyed AS (
    SELECT l.line_no, l.entry_no, l.value_date, l.direction, l.amount, l.entry_amount, l.currency,
           COALESCE(l.reference, l.ref_uuid::text) AS reference, l.ref_uuid,
           COALESCE(p.payment_id, r.refund_id) AS target_id,
           CASE WHEN p.payment_id IS NOT NULL THEN 'payment' WHEN r.refund_id IS NOT NULL THEN 'refund' END
               AS target_kind,
           COALESCE(p.payment_id, r.payment_id) AS payment_id,
           COALESCE(p.amount, r.amount) AS t_amount,
           COALESCE(p.currency, r.currency) AS t_currency,
           CASE WHEN p.payment_id IS NOT NULL THEN 'DBIT' ELSE 'CRDT' END AS t_direction,
           COALESCE(p.value_date, r.value_date) AS t_value_date,
           COALESCE(p.status, 'refunded') AS t_status,
           -- a target already matched elsewhere (another statement, or a manual match here).
           -- A join, not INSERT ... ON CONFLICT: speculative insertion of a million matches
           -- costs twice a plain one, and a first run's join finds nothing to hash.
           m.target_id IS NOT NULL AS taken,
           -- the ledger's word on the payment (refunds: not in the read model yet)
           {_LEDGER_STATE.format(kind="CASE WHEN p.payment_id IS NOT NULL THEN 'payment' ELSE 'none' END",
                                 currency="p.currency", amount="p.amount")} AS ledger
    FROM statement_lines l
    LEFT JOIN rm_payments p ON p.tenant_id = :tenant AND p.payment_id = l.ref_uuid
    LEFT JOIN rm_refunds r ON r.tenant_id = :tenant AND r.refund_id = l.ref_uuid AND p.payment_id IS NULL
    LEFT JOIN rm_ledger_totals g ON g.tenant_id = :tenant AND g.payment_id = p.payment_id
    LEFT JOIN matches m ON m.tenant_id = :tenant AND m.target_id = l.ref_uuid
    WHERE l.received_on = :received_on AND l.statement_id = :statement AND l.tenant_id = :tenant
      AND NOT EXISTS (SELECT 1 FROM matches mm WHERE mm.statement_id = :statement AND mm.line_no = l.line_no)
), classified AS (
    SELECT k.*,
           CASE
               WHEN k.target_id IS NULL THEN 'unkeyed'
               WHEN k.target_kind = 'payment' AND (k.t_status NOT IN {_SETTLED} OR k.t_amount IS NULL)
                   THEN 'not_settled'
               WHEN k.amount IS NULL THEN 'grouped'
               WHEN k.currency <> k.t_currency THEN 'currency_mismatch'
               WHEN k.direction <> k.t_direction THEN 'amount_mismatch'
               WHEN k.amount = k.t_amount THEN 'exact'
               WHEN :tolerance
                    AND abs(k.amount - k.t_amount) <= GREATEST(:tol_minor, k.t_amount * :tol_bps / 10000)
                    AND abs(k.value_date - k.t_value_date) <= :window THEN 'tolerance'
               ELSE 'amount_mismatch'
           END AS outcome
    FROM keyed k
)
-- Narrow where it can be: a million exact rows need neither their reference (it is the
-- target) nor the payment's status, and this table is scanned several times.
SELECT c.line_no, c.entry_no, c.value_date, c.direction, c.amount, c.entry_amount, c.currency,
       CASE WHEN c.outcome <> 'exact' THEN c.reference END AS reference,
       CASE WHEN c.outcome <> 'exact' THEN c.ref_uuid END AS ref_uuid,
       c.target_id, c.target_kind,
       CASE WHEN c.target_kind = 'refund' THEN c.payment_id END AS refund_payment_id,
       c.t_amount, c.t_currency, c.t_value_date,
       CASE WHEN c.outcome <> 'exact' THEN c.t_status END AS t_status,
       c.taken, c.ledger, c.outcome, 1 AS rank
FROM classified c
""")

# Several lines naming one payment: the best (exact, then tolerance, then lowest line)
# keeps rank 1, the others are duplicates. Found by hashing, not by sorting a million
# lines: only the few repeated targets are ranked.
_RANK_DUPLICATES = text("""
UPDATE w_keyed k SET rank = x.rank
FROM (
    SELECT line_no, row_number() OVER (PARTITION BY target_id ORDER BY
               CASE outcome WHEN 'exact' THEN 0 WHEN 'tolerance' THEN 1 WHEN 'grouped' THEN 2 ELSE 3 END,
               line_no) AS rank
    FROM w_keyed
    WHERE target_id IN (SELECT target_id FROM w_keyed WHERE target_id IS NOT NULL
                        GROUP BY target_id HAVING count(*) > 1)
) x
WHERE k.line_no = x.line_no AND x.rank > 1
""")

# camt.053 entries whose transaction details carry no amounts: every detail must name a
# settled payment, and their sum must be the entry's amount.
_GROUPED_ENTRIES = text("""
WITH entries AS (
    SELECT entry_no,
           bool_and(target_id IS NOT NULL AND outcome = 'grouped' AND rank = 1 AND NOT taken
                    AND currency = t_currency
                    AND direction = CASE target_kind WHEN 'payment' THEN 'DBIT' ELSE 'CRDT' END) AS complete,
           sum(t_amount) AS total, min(entry_amount) AS entry_amount, min(line_no) AS first_line
    FROM w_keyed
    WHERE entry_no IN (SELECT entry_no FROM w_keyed WHERE outcome = 'grouped')
    GROUP BY entry_no
)
-- A failed entry is one break, on its first line, whose expected amount is the sum of
-- the payments it names; its other lines are members of that break (claimed, no break).
UPDATE w_keyed k
SET outcome = CASE WHEN e.complete AND e.total = e.entry_amount THEN 'one_to_many'
                   WHEN k.line_no = e.first_line THEN 'entry_mismatch' ELSE 'entry_member' END,
    t_amount = CASE WHEN e.complete AND e.total = e.entry_amount THEN k.t_amount
                    WHEN k.line_no = e.first_line THEN e.total ELSE k.t_amount END
FROM entries e
WHERE k.entry_no = e.entry_no AND k.outcome = 'grouped'
""")

# Automatic matches are written in one statement; their counts come from w_keyed, so a
# million inserted rows are never read back.
_MATCH_KEYED = text("""
INSERT INTO matches (tenant_id, statement_id, line_no, target_kind, target_id, payment_id, rule, confidence,
                     amount_difference, date_difference, ledger, run_id, matched_by)
SELECT CAST(:tenant AS text), CAST(:statement AS uuid), k.line_no, k.target_kind, k.target_id,
       COALESCE(k.refund_payment_id, k.target_id), k.outcome,
       CASE k.outcome
           WHEN 'exact' THEN 1.0
           WHEN 'one_to_many' THEN 1.0
           ELSE GREATEST(0.5, 0.99 - 0.25 * LEAST(abs(k.amount - k.t_amount)::numeric / k.t_amount, 1)
                              - 0.2 * abs(k.value_date - k.t_value_date)::numeric / (:window + 1))
       END,
       COALESCE(k.amount - k.t_amount, 0), COALESCE(k.value_date - k.t_value_date, 0), k.ledger,
       CAST(:run AS uuid), NULL
FROM w_keyed k
WHERE k.outcome IN ('exact', 'tolerance', 'one_to_many') AND k.rank = 1 AND NOT k.taken
-- In the unique index's order: each leaf page is written once instead of at random, which
-- makes a million-row insert two to three times cheaper than the sort costs.
ORDER BY k.target_id
""")

_KEYED_COUNTS = text("""
WITH checked AS (
    INSERT INTO w_ledger_check (target_id)
    SELECT target_id FROM w_keyed
    WHERE outcome IN ('exact', 'tolerance', 'one_to_many') AND rank = 1 AND NOT taken
      AND ledger IN ('missing', 'mismatch')
)
SELECT outcome, ledger, count(*) FROM w_keyed
WHERE outcome IN ('exact', 'tolerance', 'one_to_many') AND rank = 1 AND NOT taken
GROUP BY outcome, ledger
""")

# Settled payments and refunds of the period that no line claimed and no statement matched.
# Lines of this statement explain most of them (one hash anti-join); only the few left are
# looked up among every statement's matches (index probes, however many matches exist).
_OPEN_TARGETS = text(f"""
CREATE TEMP TABLE w_open ON COMMIT DROP AS
WITH unreferenced AS MATERIALIZED (
SELECT t.* FROM (
    SELECT p.payment_id AS target_id, 'payment' AS target_kind, p.payment_id, p.amount, p.currency,
           'DBIT' AS direction, p.value_date, replace(p.payment_id::text, '-', '') AS hex
    FROM rm_payments p
    WHERE p.tenant_id = :tenant AND p.value_date BETWEEN :period_start AND :period_end
      AND p.status IN {_SETTLED} AND p.amount IS NOT NULL
    UNION ALL
    SELECT r.refund_id, 'refund', r.payment_id, r.amount, r.currency, 'CRDT', r.value_date,
           replace(r.refund_id::text, '-', '')
    FROM rm_refunds r
    WHERE r.tenant_id = :tenant AND r.value_date BETWEEN :period_start AND :period_end
) t
WHERE NOT EXISTS (SELECT 1 FROM w_keyed k WHERE k.target_id = t.target_id)
)
SELECT u.* FROM unreferenced u
WHERE NOT EXISTS (SELECT 1 FROM matches m WHERE m.tenant_id = :tenant AND m.target_id = u.target_id)
""")

_CLAIMED = text("""
CREATE TEMP TABLE w_claimed ON COMMIT DROP AS
SELECT DISTINCT target_id FROM w_keyed
WHERE target_id IS NOT NULL AND outcome NOT IN ('exact', 'tolerance', 'one_to_many')
""")

# One unreferenced line = the sum of the open payments of one (currency, direction, value
# date) group, both sides unique: a processor's batch settlement.
_ONE_TO_MANY = text(f"""
WITH groups AS (
    SELECT currency, direction, value_date, sum(amount) AS total, count(*) AS n
    FROM w_open GROUP BY currency, direction, value_date HAVING count(*) > 1
), candidates AS (
    SELECT k.line_no, g.currency, g.direction, g.value_date
    FROM w_keyed k
    JOIN groups g ON g.currency = k.currency AND g.direction = k.direction AND g.total = k.amount
                 AND abs(k.value_date - g.value_date) <= :window
    WHERE k.outcome = 'unkeyed' AND k.amount IS NOT NULL
), unique_pairs AS (
    SELECT c.* FROM candidates c
    WHERE (SELECT count(*) FROM candidates x WHERE x.line_no = c.line_no) = 1
      AND (SELECT count(*) FROM candidates x
           WHERE (x.currency, x.direction, x.value_date) = (c.currency, c.direction, c.value_date)) = 1
), inserted AS (
    INSERT INTO matches (tenant_id, statement_id, line_no, target_kind, target_id, payment_id, rule, confidence,
                         amount_difference, date_difference, ledger, run_id, matched_by)
    SELECT CAST(:tenant AS text), CAST(:statement AS uuid), u.line_no, o.target_kind, o.target_id, o.payment_id,
           'one_to_many', 0.9, 0,
           k.value_date - o.value_date,
           {_LEDGER_STATE.format(kind="o.target_kind", currency="o.currency", amount="o.amount")},
           CAST(:run AS uuid), NULL
    FROM unique_pairs u
    JOIN w_open o ON (o.currency, o.direction, o.value_date) = (u.currency, u.direction, u.value_date)
    JOIN w_keyed k ON k.line_no = u.line_no
    LEFT JOIN rm_ledger_totals g ON g.tenant_id = :tenant AND g.payment_id = o.payment_id
                                AND o.target_kind = 'payment'
    RETURNING line_no, target_id, rule, ledger
), marked AS (
    UPDATE w_keyed SET outcome = 'one_to_many' WHERE line_no IN (SELECT line_no FROM inserted)
), checked AS (
    INSERT INTO w_ledger_check (target_id) SELECT target_id FROM inserted WHERE ledger IN ('missing', 'mismatch')
), removed AS (
    DELETE FROM w_open WHERE target_id IN (SELECT target_id FROM inserted)
)
-- a batch line is reconciled only if the ledger agrees for every payment in it
SELECT 'one_to_many', CASE WHEN bool_and(ledger IN ('agrees', 'not_applicable')) THEN 'agrees' ELSE 'mismatch' END, 1
FROM inserted GROUP BY line_no
""")

# What is left: a reference a few edits away from a payment id (typos, a truncated
# end-to-end id, an id inside other text), with currency, direction, amount (within the
# tolerance) and value date (within the window) agreeing. Unique on both sides.
_FUZZY = text(f"""
WITH lines AS (
    SELECT line_no, amount, currency, direction, value_date,
           regexp_replace(lower(reference), '[^0-9a-f]', '', 'g') AS ref
    FROM w_keyed WHERE outcome = 'unkeyed' AND reference IS NOT NULL AND amount IS NOT NULL
), candidates AS (
    SELECT l.line_no, o.target_id, o.value_date - l.value_date AS days,
           CASE WHEN strpos(l.ref, o.hex) > 0 THEN 0
                WHEN length(l.ref) >= :min_prefix AND length(l.ref) < 32 AND left(o.hex, length(l.ref)) = l.ref
                    THEN 1
                ELSE levenshtein_less_equal(l.ref, o.hex, :max_distance) END AS distance
    FROM lines l
    JOIN w_open o ON o.currency = l.currency AND o.direction = l.direction
                 AND abs(l.amount - o.amount) <= GREATEST(:tol_minor, o.amount * :tol_bps / 10000)
                 AND abs(l.value_date - o.value_date) <= :window
    WHERE length(l.ref) >= :min_prefix
), close AS (
    SELECT * FROM candidates WHERE distance <= :max_distance
), best AS (
    SELECT c.* FROM close c
    WHERE NOT EXISTS (SELECT 1 FROM close x WHERE x.line_no = c.line_no AND x.target_id <> c.target_id
                      AND x.distance <= c.distance)
      AND NOT EXISTS (SELECT 1 FROM close x WHERE x.target_id = c.target_id AND x.line_no <> c.line_no
                      AND x.distance <= c.distance)
), inserted AS (
    INSERT INTO matches (tenant_id, statement_id, line_no, target_kind, target_id, payment_id, rule, confidence,
                         amount_difference, date_difference, ledger, run_id, matched_by)
    SELECT CAST(:tenant AS text), CAST(:statement AS uuid), b.line_no, o.target_kind, o.target_id, o.payment_id,
           'fuzzy',
           GREATEST(0.5, 0.9 - 0.1 * b.distance), k.amount - o.amount, k.value_date - o.value_date,
           {_LEDGER_STATE.format(kind="o.target_kind", currency="o.currency", amount="o.amount")},
           CAST(:run AS uuid), NULL
    FROM best b
    JOIN w_open o ON o.target_id = b.target_id
    JOIN w_keyed k ON k.line_no = b.line_no
    LEFT JOIN rm_ledger_totals g ON g.tenant_id = :tenant AND g.payment_id = o.payment_id
                                AND o.target_kind = 'payment'
    RETURNING line_no, target_id, rule, ledger
), marked AS (
    UPDATE w_keyed SET outcome = 'fuzzy' WHERE line_no IN (SELECT line_no FROM inserted)
), checked AS (
    INSERT INTO w_ledger_check (target_id) SELECT target_id FROM inserted WHERE ledger IN ('missing', 'mismatch')
), removed AS (
    DELETE FROM w_open WHERE target_id IN (SELECT target_id FROM inserted)
)
SELECT rule, ledger, count(*) AS n FROM inserted GROUP BY rule, ledger
""")

# ── breaks ──────────────────────────────────────────────────────────────────────────
_BREAK_COLUMNS = ("type, break_key, source, amount, expected_amount, currency, expected_currency, reference, "
                  "target_id, payment_id, line_no, value_date, detail")

_LINE_BREAKS = text(f"""
INSERT INTO w_break ({_BREAK_COLUMNS})
SELECT CASE
           WHEN k.outcome = 'not_settled' OR k.outcome = 'unkeyed' THEN 'missing_in_payments'
           WHEN k.taken OR (k.rank > 1 AND EXISTS (SELECT 1 FROM matches m
                                                  WHERE m.tenant_id = :tenant AND m.target_id = k.target_id))
               THEN 'duplicate'
           WHEN k.outcome = 'currency_mismatch' THEN 'currency_mismatch'
           ELSE 'amount_mismatch'
       END,
       'line:' || k.line_no, 'statement', COALESCE(k.amount, k.entry_amount), k.t_amount, k.currency, k.t_currency,
       COALESCE(k.reference, k.ref_uuid::text, k.target_id::text), k.target_id,
       COALESCE(k.refund_payment_id, k.target_id), k.line_no, k.value_date,
       CASE
           WHEN k.outcome = 'unkeyed' AND k.ref_uuid IS NOT NULL THEN 'no payment or refund has this reference'
           WHEN k.outcome = 'unkeyed' THEN 'the line names no payment and matched none'
           WHEN k.outcome = 'not_settled' THEN 'payments has not settled this payment (status ' || k.t_status || ')'
           WHEN k.taken THEN 'the payment is already matched to another statement line'
           WHEN k.rank > 1 THEN 'another line of this statement already matched this payment'
           WHEN k.outcome = 'currency_mismatch' THEN 'the line and the payment are in different currencies'
           WHEN k.outcome = 'entry_mismatch' THEN 'the entry''s transactions do not add up to its amount'
           WHEN k.direction <> CASE k.target_kind WHEN 'payment' THEN 'DBIT' ELSE 'CRDT' END
               THEN 'the line moves money the other way (' || k.direction || ')'
           ELSE 'the line and the payment differ in amount'
       END
FROM w_keyed k
WHERE k.outcome NOT IN ('exact', 'tolerance', 'one_to_many', 'fuzzy', 'entry_member')
   OR ((k.outcome IN ('exact', 'tolerance', 'one_to_many')) AND (k.rank > 1 OR k.taken))
""")

_MISSING_IN_STATEMENT = text(f"""
INSERT INTO w_break ({_BREAK_COLUMNS})
SELECT 'missing_in_statement', o.target_kind || ':' || o.target_id, 'payments', o.amount, NULL, o.currency, NULL,
       o.target_id::text, o.target_id, o.payment_id, NULL, o.value_date,
       CASE o.target_kind WHEN 'payment' THEN 'settled in payments, not on the statement'
                          ELSE 'refunded in payments, not on the statement' END
FROM w_open o
""")

# The ledger leg, for every payment this statement matched or should have.
_LEDGER_BREAKS = text(f"""
INSERT INTO w_break ({_BREAK_COLUMNS})
SELECT CASE
           WHEN g.payment_id IS NULL THEN 'missing_in_ledger'
           WHEN g.currency <> p.currency OR g.other_currency IS NOT NULL THEN 'currency_mismatch'
           WHEN g.postings - 2 * g.reversals > 1 THEN 'duplicate'
           ELSE 'amount_mismatch'
       END,
       'ledger:' || p.payment_id, 'ledger', COALESCE(g.amount, p.amount), p.amount, COALESCE(g.currency, p.currency),
       p.currency, p.payment_id::text, p.payment_id, p.payment_id, NULL, p.value_date,
       CASE
           WHEN g.payment_id IS NULL THEN 'settled in payments, never posted in the ledger'
           WHEN g.currency <> p.currency OR g.other_currency IS NOT NULL THEN 'the ledger posted it in another currency'
           WHEN g.postings - 2 * g.reversals > 1 THEN 'the ledger posted it ' || g.postings || ' times'
           ELSE 'the ledger posted another amount'
       END
FROM (SELECT DISTINCT target_id FROM (
          SELECT target_id FROM w_ledger_check
          UNION ALL SELECT target_id FROM w_open WHERE target_kind = 'payment'
          UNION ALL SELECT c.target_id FROM w_claimed c) t) x
JOIN rm_payments p ON p.tenant_id = :tenant AND p.payment_id = x.target_id AND p.status IN {_SETTLED}
LEFT JOIN rm_ledger_totals g ON g.tenant_id = :tenant AND g.payment_id = p.payment_id
WHERE g.payment_id IS NULL OR g.currency <> p.currency OR g.other_currency IS NOT NULL OR g.amount <> p.amount
""")

# Money the ledger moved in the period for a payment that payments never settled.
_LEDGER_WITHOUT_PAYMENT = text(f"""
INSERT INTO w_break ({_BREAK_COLUMNS})
SELECT 'missing_in_payments', 'ledger:' || g.payment_id, 'ledger', abs(g.amount), NULL, g.currency, NULL,
       g.payment_id::text, g.payment_id, g.payment_id, NULL, g.value_date,
       CASE WHEN p.payment_id IS NULL THEN 'the ledger posted money for a payment payments does not know'
            ELSE 'the ledger posted money for a payment that is ' || p.status || ' in payments' END
FROM rm_ledger_totals g
LEFT JOIN rm_payments p ON p.tenant_id = g.tenant_id AND p.payment_id = g.payment_id
WHERE g.tenant_id = :tenant AND g.value_date BETWEEN :period_start AND :period_end AND g.amount <> 0
  AND (p.payment_id IS NULL OR p.status NOT IN {_SETTLED})
""")

# Re-open breaks a run had cleared but finds again; a person's resolution stands.
_REOPEN = text(f"""
WITH reopened AS (
    UPDATE breaks b
    SET status = 'open', resolved_at = NULL, resolved_by = NULL, resolution = NULL, resolution_reason = NULL,
        last_run_id = :run, amount = w.amount, expected_amount = w.expected_amount, detail = w.detail
    FROM w_break w
    WHERE b.tenant_id = :tenant AND b.statement_id = :statement AND b.type = w.type AND b.break_key = w.break_key
      AND b.status = 'resolved' AND b.resolution IN ('cleared_by_run', 'matched_in_other_statement')
    RETURNING b.*
)
INSERT INTO events (id, tenant_id, aggregate_type, aggregate_id, type, schema_version, payload, actor, reason,
                    correlation_id, causation_id, traceparent, occurred_at)
SELECT gen_random_uuid(), CAST(:tenant AS text), 'break', r.id::text, 'reconciliation.break.opened.v1', 1,
       jsonb_build_object('break_id', r.id, 'run_id', CAST(:run_text AS text),
                          'statement_id', CAST(:statement_text AS text), 'type', r.type,
                          'amount', r.amount, 'expected_amount', r.expected_amount, 'currency', r.currency,
                          'reference', r.reference, 'payment_id', r.payment_id, 'line_no', r.line_no,
                          'source', r.source, 'reopened', true),
       '{ACTOR}', 'found again by a run', CAST(:correlation AS text), CAST(:run_text AS text),
       CAST(:traceparent AS text), clock_timestamp()
FROM reopened r
""")

_UPSERT = text(f"""
WITH upserted AS (
    INSERT INTO breaks (id, tenant_id, statement_id, run_id, last_run_id, status, {_BREAK_COLUMNS})
    SELECT gen_random_uuid(), CAST(:tenant AS text), CAST(:statement AS uuid), CAST(:run AS uuid),
           CAST(:run AS uuid), 'open', {_BREAK_COLUMNS} FROM w_break
    ON CONFLICT (tenant_id, statement_id, type, break_key) DO UPDATE
        SET last_run_id = EXCLUDED.last_run_id, amount = EXCLUDED.amount, expected_amount = EXCLUDED.expected_amount,
            currency = EXCLUDED.currency, expected_currency = EXCLUDED.expected_currency, detail = EXCLUDED.detail
    RETURNING breaks.*, (xmax = 0) AS inserted
), opened AS (
    INSERT INTO events (id, tenant_id, aggregate_type, aggregate_id, type, schema_version, payload, actor, reason,
                        correlation_id, causation_id, traceparent, occurred_at)
    SELECT gen_random_uuid(), CAST(:tenant AS text), 'break', u.id::text, 'reconciliation.break.opened.v1', 1,
           jsonb_build_object('break_id', u.id, 'run_id', CAST(:run_text AS text),
                              'statement_id', CAST(:statement_text AS text), 'type', u.type,
                              'amount', u.amount, 'expected_amount', u.expected_amount, 'currency', u.currency,
                              'reference', u.reference, 'payment_id', u.payment_id, 'line_no', u.line_no,
                              'source', u.source, 'reopened', false),
           '{ACTOR}', u.detail, CAST(:correlation AS text), CAST(:run_text AS text),
       CAST(:traceparent AS text), clock_timestamp()
    FROM upserted u WHERE u.inserted
    RETURNING 1
)
SELECT count(*) FROM opened
""")

_RESOLVED_EVENTS = """
INSERT INTO events (id, tenant_id, aggregate_type, aggregate_id, type, schema_version, payload, actor, reason,
                    correlation_id, causation_id, traceparent, occurred_at)
SELECT gen_random_uuid(), CAST(:tenant AS text), 'break', c.id::text, 'reconciliation.break.resolved.v1', 1,
       jsonb_build_object('break_id', c.id, 'type', c.type, 'resolution', c.resolution,
                          'reason', c.resolution_reason, 'resolved_by', c.resolved_by, 'payment_id', c.payment_id,
                          'run_id', CAST(:run_text AS text)),
       '{actor}', c.resolution_reason, CAST(:correlation AS text), CAST(:run_text AS text),
       CAST(:traceparent AS text), clock_timestamp()
FROM cleared c
RETURNING 1
"""

# Open breaks of this statement that this run did not find any more.
_CLEAR = text(f"""
WITH cleared AS (
    UPDATE breaks
    SET status = 'resolved', resolution = 'cleared_by_run', resolved_by = '{ACTOR}', resolved_at = clock_timestamp(),
        resolution_reason = 'no longer found by run ' || :run_text
    WHERE tenant_id = :tenant AND statement_id = :statement AND status = 'open' AND last_run_id <> :run
    RETURNING *
), emitted AS ({_RESOLVED_EVENTS.format(actor=ACTOR)})
SELECT count(*) FROM emitted
""")

# A payment this run matched was reported missing by another statement's run (a payout
# that settled on one day and reached the bank on the next): that break is now explained.
_CLEAR_ELSEWHERE = text(f"""
WITH cleared AS (
    UPDATE breaks b
    SET status = 'resolved', resolution = 'matched_in_other_statement', resolved_by = '{ACTOR}',
        resolved_at = clock_timestamp(),
        resolution_reason = 'matched by statement ' || :statement_text || ' in run ' || :run_text
    WHERE b.tenant_id = :tenant AND b.status = 'open' AND b.type = 'missing_in_statement'
      AND b.statement_id <> :statement
      AND EXISTS (SELECT 1 FROM matches m WHERE m.tenant_id = :tenant AND m.target_id = b.target_id
                  AND m.statement_id = :statement)
    RETURNING b.*
), emitted AS ({_RESOLVED_EVENTS.format(actor=ACTOR)})
SELECT count(*) FROM emitted
""")


async def reconcile(*, session: AsyncSession, scope: RunScope, rules: Rules, work_mem_mb: int,
                    progress: Progress) -> RunOutcome:
    """Reconcile one statement, in the session's transaction (the caller commits)."""
    started = time.perf_counter()
    outcome = RunOutcome()
    passes = set(rules.passes())
    params = {
        "tenant": scope.tenant_id, "statement": scope.statement_id, "statement_text": str(scope.statement_id),
        "received_on": scope.received_on, "period_start": scope.period_start, "period_end": scope.period_end,
        "run": scope.run_id, "run_text": str(scope.run_id), "correlation": scope.correlation_id,
        "traceparent": scope.traceparent, "window": rules.date_window_days, "tol_minor": rules.amount_tolerance_minor,
        "tol_bps": rules.amount_tolerance_bps, "tolerance": MatchRule.TOLERANCE in passes,
        "max_distance": rules.fuzzy_max_distance, "min_prefix": rules.fuzzy_min_prefix,
    }

    async def run(statement) -> list:
        result = await session.execute(statement, params)
        return list(result) if result.returns_rows else []

    # Hash joins get memory of their own, bounded: a 1M-line statement must not make the
    # backend grow without limit, and spilling beats swapping.
    await session.execute(text(f"SET LOCAL work_mem = '{int(work_mem_mb)}MB'"))
    # One run per tenant at a time: two runs claiming the same payment would otherwise race
    # on the unique index and fail one another.
    await repository.lock_tenant_matching(session, tenant_id=scope.tenant_id)
    # A re-run replaces the automatic matches of this statement; a person's manual matches stay.
    await session.execute(text("DELETE FROM matches WHERE statement_id = :statement AND rule <> 'manual'"),
                          {"statement": scope.statement_id})
    await session.execute(text(
        "CREATE TEMP TABLE w_ledger_check (target_id uuid NOT NULL) ON COMMIT DROP"))
    await session.execute(text(
        "CREATE TEMP TABLE w_break (type text NOT NULL, break_key text NOT NULL, source text NOT NULL, "
        "amount bigint, expected_amount bigint, currency text, expected_currency text, reference text, "
        "target_id uuid, payment_id uuid, line_no integer, value_date date, detail text NOT NULL) ON COMMIT DROP"))

    clock = outcome.timed("setup", started)

    await progress("keyed")
    await run(_KEYED)
    # Statistics for the planner's next joins; a small sample is enough to know sizes and
    # the few outcomes, and it reads a tenth of the pages the default would.
    await session.execute(text("SET LOCAL default_statistics_target = 10"))
    await session.execute(text("ANALYZE w_keyed"))
    await run(_RANK_DUPLICATES)
    outcome.lines = scope.lines
    if scope.format == "camt053":  # only camt.053 details can lack amounts
        await run(_GROUPED_ENTRIES)
    clock = outcome.timed("keyed", clock)
    await run(_MATCH_KEYED)
    await _count(outcome, await run(_KEYED_COUNTS))
    clock = outcome.timed("write_matches", clock)
    await progress("open_targets", lines=outcome.lines, matched=outcome.matched)
    await run(_CLAIMED)
    await run(_OPEN_TARGETS)
    await session.execute(text("ANALYZE w_open"))
    clock = outcome.timed("open_targets", clock)
    if MatchRule.ONE_TO_MANY in passes:
        await progress("one_to_many", matched=outcome.matched)
        await _count(outcome, await run(_ONE_TO_MANY))
        clock = outcome.timed("one_to_many", clock)
    if MatchRule.FUZZY in passes:
        await progress("fuzzy", matched=outcome.matched)
        await _count(outcome, await run(_FUZZY))
        clock = outcome.timed("fuzzy", clock)
    manual = (await session.execute(text(
        "SELECT count(DISTINCT line_no) FILTER (WHERE ledger IN ('agrees', 'not_applicable')), "
        "count(DISTINCT line_no) FROM matches WHERE statement_id = :statement AND rule = 'manual'"),
        {"statement": scope.statement_id})).one()
    outcome.matched += manual[0]
    if manual[1]:
        outcome.by_rule["manual"] = manual[1]

    await progress("breaks", matched=outcome.matched)
    await run(_LINE_BREAKS)
    await run(_MISSING_IN_STATEMENT)
    await run(_LEDGER_BREAKS)
    clock = outcome.timed("breaks_found", clock)
    await run(_LEDGER_WITHOUT_PAYMENT)
    clock = outcome.timed("ledger_without_payment", clock)
    await run(_REOPEN)
    outcome.breaks_opened = (await run(_UPSERT))[0][0]
    outcome.breaks_resolved = (await run(_CLEAR))[0][0] + (await run(_CLEAR_ELSEWHERE))[0][0]
    outcome.breaks = (await session.execute(text(
        "SELECT count(*) FROM breaks WHERE tenant_id = :tenant AND statement_id = :statement AND status = 'open'"),
        {"tenant": scope.tenant_id, "statement": scope.statement_id})).scalar_one()
    outcome.timed("breaks_written", clock)
    return outcome


async def _count(outcome: RunOutcome, rows: list) -> None:
    for rule, ledger, n in rows:
        outcome.by_rule[rule] = outcome.by_rule.get(rule, 0) + n
        if ledger in ("agrees", "not_applicable"):
            outcome.matched += n
