"""`verify(database_url)`: the payments service's invariants, checked read-only against
its database; returns one line per violation (an empty list means all hold).

  1. every approved/submitted/settled/refunded payment has a recorded granted approval
     (a payment.approved event carrying the approval id), invariant 4
  2. no payment is submitted, settled or failed twice, none both settled and failed, and
     none has more than one payout at the processor: no payment moves money twice (3)
  3. every payment and refund row equals its rebuild from the event log (5)
  4. no plaintext PII: payee columns are ciphertext (bytea) or masked, no column outside
     the vault is named for an IBAN or a name, and no event payload holds a valid IBAN
  5. a payment's refunded amount is the sum of its succeeded refunds

It runs in one REPEATABLE READ, READ ONLY transaction, so it sees one consistent moment
and can never change anything.
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from typing import Any

import asyncpg
import orjson

from services.payments.domain import APPROVED_STATUSES, Payment, RecordedEvent, Refund
from shared.db import plain_url
from shared.redaction import is_valid_iban

PAYMENT_FIELDS = ("status", "amount", "currency", "debit_account_id", "reference", "metadata", "payee_name_masked",
                  "payee_iban_masked", "created_by", "failure_reason", "cancellation_reason", "approval_id",
                  "hold_id", "processor", "processor_payment_id", "value_date", "refunded_amount", "version",
                  "created_at", "updated_at")
REFUND_FIELDS = ("payment_id", "status", "amount", "currency", "reason", "failure_reason", "processor_refund_id",
                 "created_by", "version", "created_at", "updated_at")
MASKED_IBAN = re.compile(r"^[A-Z]{2}[0-9]{2}\*{8}[A-Z0-9]{4}$")
IBAN_CANDIDATE = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}")
# Columns that may be named for PII because they hold it protected.
PROTECTED_COLUMNS = {("payments", "payee_name_masked"), ("payments", "payee_iban_masked"),
                     ("payee_vault", "name_ciphertext"), ("payee_vault", "iban_ciphertext")}


async def verify(database_url: str) -> list[str]:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        await conn.set_type_codec("jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
                                  schema="pg_catalog")
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            problems: list[str] = []
            problems += await _approvals_recorded(conn)
            problems += await _money_moves_once(conn)
            problems += await _projections_match_the_log(conn)
            problems += await _no_plaintext_pii(conn)
            problems += await _refunds_add_up(conn)
            return problems
    finally:
        await conn.close()


async def _approvals_recorded(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        """
        SELECT p.id, p.status FROM payments p
        WHERE p.status = ANY($1::text[])
          AND (p.approval_id IS NULL OR NOT EXISTS (
                SELECT 1 FROM events e
                WHERE e.aggregate_type = 'payment' AND e.aggregate_id = p.id::text
                  AND e.type = 'payment.approved.v1' AND e.payload->>'approval_id' = p.approval_id))
        """, [str(s) for s in APPROVED_STATUSES])
    return [f"payment {r['id']} is {r['status']} without a recorded granted approval" for r in rows]


async def _money_moves_once(conn: asyncpg.Connection) -> list[str]:
    problems = []
    for row in await conn.fetch(
        """
        SELECT aggregate_id, type, count(*) AS n FROM events
        WHERE aggregate_type = 'payment'
          AND type IN ('payment.submitted.v1', 'payment.settled.v1', 'payment.failed.v1', 'payment.approved.v1')
        GROUP BY aggregate_id, type HAVING count(*) > 1
        """):
        problems.append(f"payment {row['aggregate_id']} has {row['n']} {row['type']} events")
    for row in await conn.fetch(
        """
        SELECT aggregate_id FROM events WHERE aggregate_type = 'payment'
          AND type IN ('payment.settled.v1', 'payment.failed.v1')
        GROUP BY aggregate_id HAVING count(DISTINCT type) > 1
        """):
        problems.append(f"payment {row['aggregate_id']} was both settled and failed")
    for row in await conn.fetch(
        "SELECT payment_id, count(*) AS n FROM processor_attempts WHERE kind = 'payout' "
        "GROUP BY payment_id HAVING count(*) > 1"):
        problems.append(f"payment {row['payment_id']} has {row['n']} payout requests")
    for row in await conn.fetch(
        """
        SELECT p.id FROM payments p
        WHERE p.status IN ('submitted', 'settled', 'partially_refunded', 'refunded')
          AND NOT EXISTS (SELECT 1 FROM processor_attempts a WHERE a.payment_id = p.id AND a.kind = 'payout')
        """):
        problems.append(f"payment {row['id']} reached the processor without a recorded request")
    return problems


async def _projections_match_the_log(conn: asyncpg.Connection) -> list[str]:
    problems = []
    events: dict[tuple[str, str], list[RecordedEvent]] = defaultdict(list)
    tenants: dict[tuple[str, str], str] = {}
    async for row in conn.cursor(
            "SELECT aggregate_type, aggregate_id, tenant_id, type, payload, occurred_at FROM events "
            "WHERE aggregate_type IN ('payment', 'refund') ORDER BY seq"):
        key = (row["aggregate_type"], row["aggregate_id"])
        events[key].append(RecordedEvent(type=row["type"], payload=row["payload"], occurred_at=row["occurred_at"]))
        tenants[key] = row["tenant_id"]
    for kind, table, fields, aggregate in (("payment", "payments", PAYMENT_FIELDS, Payment),
                                            ("refund", "refunds", REFUND_FIELDS, Refund)):
        seen = set()
        async for row in conn.cursor(f"SELECT * FROM {table}"):
            key = (kind, str(row["id"]))
            seen.add(key)
            if key not in events:
                problems.append(f"{kind} {row['id']} has no events")
                continue
            if tenants[key] != row["tenant_id"]:
                problems.append(f"{kind} {row['id']}: tenant differs from its events")
            rebuilt = aggregate.replay(id=uuid.UUID(key[1]), tenant_id=row["tenant_id"], events=events[key])
            for name in fields:
                stored, derived = _plain(row[name]), _plain(getattr(rebuilt, name))
                if stored != derived:
                    problems.append(f"{kind} {row['id']}: {name} is {stored!r} but the event log says {derived!r}")
        for key in events:
            if key[0] == kind and key not in seen:
                problems.append(f"{kind} {key[1]} has events but no row")
    return problems


def _plain(value: Any) -> Any:
    """Compare ids and statuses as text: the row has UUIDs and strings, the rebuild enums."""
    return str(value) if isinstance(value, (uuid.UUID, str)) else value


async def _no_plaintext_pii(conn: asyncpg.Connection) -> list[str]:
    problems = []
    for row in await conn.fetch(
        """
        SELECT table_name, column_name, data_type FROM information_schema.columns
        WHERE table_schema = current_schema() AND (column_name ILIKE '%iban%' OR column_name ILIKE '%name%')
        """):
        place = (row["table_name"], row["column_name"])
        if place not in PROTECTED_COLUMNS:
            problems.append(f"column {place[0]}.{place[1]} looks like PII outside the vault")
        elif place[0] == "payee_vault" and row["data_type"] != "bytea":
            problems.append(f"column {place[0]}.{place[1]} is {row['data_type']}, not ciphertext")
    for row in await conn.fetch("SELECT id, payee_iban_masked FROM payments WHERE payee_iban_masked !~ $1",
                                MASKED_IBAN.pattern):
        problems.append(f"payment {row['id']}: payee_iban_masked is not masked")
    async for row in conn.cursor("SELECT id, payload::text AS text FROM events"):
        if any(is_valid_iban(candidate) for candidate in IBAN_CANDIDATE.findall(row["text"])):
            problems.append(f"event {row['id']} carries an unmasked IBAN")
    return problems


async def _refunds_add_up(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        """
        SELECT p.id, p.refunded_amount,
               COALESCE((SELECT sum(r.amount) FROM refunds r WHERE r.payment_id = p.id AND r.status = 'succeeded'), 0)
                 AS succeeded
        FROM payments p
        WHERE p.refunded_amount <> COALESCE((SELECT sum(r.amount) FROM refunds r
                                             WHERE r.payment_id = p.id AND r.status = 'succeeded'), 0)
        """)
    return [f"payment {r['id']}: refunded_amount {r['refunded_amount']} but succeeded refunds sum to {r['succeeded']}"
            for r in rows]
