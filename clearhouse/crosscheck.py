"""The invariants no single service can check alone, for `clearhouse verify`: they join
what payments says happened with what the ledger did about it (design section 7).

    payments (status, amount)  ⟷  ledger hold for the payment (status, amount)
      settled / refunded       →  exactly one hold, posted, for the payment's amount
      failed / cancelled       →  no hold, or a released one (voided / expired): no money moved
      rejected / pending       →  no hold at all (a hold needs a granted approval)
      approved / submitted     →  no hold yet, or a pending one
    every hold for a payment   →  that payment exists, same tenant, same amount
    every service's event log  →  every committed event is published (invariant 6)

Read-only: each database is read with the service's own app role in a REPEATABLE READ,
READ ONLY transaction. The two databases cannot be read in one snapshot, so payments is
read first and the ledger second (a hold is only ever newer than the payment state that
caused it), and states still in flight are judged only once they are older than `grace_s`:
a payment settled a moment ago may wait for the ledger to consume payment.settled.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from shared.db import plain_url

SETTLED = ("settled", "partially_refunded", "refunded")
RELEASED = ("voided", "expired")
# Clock margin between two databases that may live on different servers.
SKEW = timedelta(seconds=5)


async def verify_across(urls: dict[str, str], *, grace_s: float = 60.0) -> list[str]:
    """Violations of the cross-service invariants (empty = all hold)."""
    grace = timedelta(seconds=grace_s)
    payments, snapshot = await _read(urls["payments"], "SELECT id::text AS id, tenant_id, status, amount, hold_id, "
                                     "updated_at FROM payments")
    holds, _ = await _read(urls["ledger"], "SELECT id::text AS id, tenant_id, payment_id, status, amount, "
                           "amount_posted, created_at, resolved_at FROM holds WHERE payment_id IS NOT NULL")
    problems = _match(payments, holds, snapshot=snapshot, grace=grace)
    for service, url in urls.items():
        problems += await _unpublished(service, url, grace)
    return problems


async def _read(url: str, query: str) -> tuple[list[asyncpg.Record], object]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            return await conn.fetch(query), await conn.fetchval("SELECT now()")
    finally:
        await conn.close()


def _match(payments, holds, *, snapshot, grace: timedelta) -> list[str]:
    problems: list[str] = []
    by_payment = {(h["tenant_id"], h["payment_id"]): h for h in holds}  # unique per (tenant, payment)
    known = set()
    for p in payments:
        key = (p["tenant_id"], p["id"])
        known.add(key)
        hold, status, settled_long_ago = by_payment.get(key), p["status"], p["updated_at"] < snapshot - grace
        name = f"payment {p['id']} ({status}, {p['amount']})"
        if hold is not None and hold["amount"] != p["amount"]:
            problems.append(f"{name}: its hold {hold['id']} is for {hold['amount']}")
        if hold is not None and p["hold_id"] is not None and p["hold_id"] != hold["id"]:
            problems.append(f"{name}: records hold {p['hold_id']} but the ledger holds {hold['id']} for it")
        if status in SETTLED:
            if hold is None:
                problems.append(f"{name}: settled without a hold in the ledger")
            elif hold["status"] == "posted":
                if hold["amount_posted"] != p["amount"]:
                    problems.append(f"{name}: its hold {hold['id']} posted {hold['amount_posted']}")
            elif hold["status"] != "pending" or settled_long_ago:
                problems.append(f"{name}: its hold {hold['id']} is {hold['status']}, not posted")
        elif status in ("failed", "cancelled"):
            if hold is not None and (hold["status"] == "posted" or (hold["status"] == "pending" and settled_long_ago)):
                problems.append(f"{name}: its hold {hold['id']} is {hold['status']}, not released")
        elif status in ("rejected", "pending_approval"):
            if hold is not None:
                problems.append(f"{name}: has hold {hold['id']} ({hold['status']}) without an approval")
        elif hold is not None and hold["status"] != "pending" and hold["resolved_at"] < snapshot - SKEW:
            # approved / submitted: the ledger resolved the hold before payments' snapshot,
            # so the payment's final state should have been visible in it.
            problems.append(f"{name}: its hold {hold['id']} is already {hold['status']}")
    for key, hold in by_payment.items():
        if key not in known and hold["created_at"] < snapshot - SKEW:
            problems.append(f"hold {hold['id']} ({hold['status']}, {hold['amount']}) is for payment {key[1]} "
                            f"of tenant {key[0]}, which payments does not know")
    return problems


async def _unpublished(service: str, url: str, grace: timedelta) -> list[str]:
    rows, _ = await _read(url, "SELECT count(*) AS n, min(seq) AS first, min(occurred_at) AS oldest FROM events "
                          f"WHERE published_at IS NULL AND occurred_at < now() - interval '{grace.total_seconds()} s'")
    n = rows[0]["n"]
    if not n:
        return []
    return [f"{service}: {n} committed event(s) unpublished for more than {grace.total_seconds():.0f}s "
            f"(first seq {rows[0]['first']}, oldest {rows[0]['oldest']:%Y-%m-%dT%H:%M:%S}Z)"]
