"""Benchmark: GET /v1/ledger/accounts/{id}/balance?as_of=… on an account with 1,000,000
entries, through the ledger API (a real uvicorn process, internal token checked).

    .venv/bin/python bench/ledger_as_of.py [--entries 1000000] [--requests 3000] [--clients 1]

The history is generated inside PostgreSQL with generate_series (a transaction every
millisecond, 100 minor units each; every fifth one a pending hold that is released by the
next), as the service would have written it: same tables, same triggers. Each answer
is checked against the closed form of that history, so a fast wrong answer fails.
Target (issue 3): p99 ≤ 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from datetime import datetime, timedelta, timezone

import asyncpg
import orjson
from ledger_common import CpuMeter, bearer, call, embedded_ledger, ledger_api, load, use_uvloop

from shared.db import plain_url

AMOUNT = 100
CHUNK = 100_000
START = datetime(2025, 1, 1, tzinfo=timezone.utc)

# Transaction i (1-based) happens at START + i ms. Kinds cycle with i % 5:
#   1, 2, 3 posted transfer: hot credited AMOUNT, counter debited
#   4       hold placed: hot pending credit AMOUNT, counter pending debit
#   0       that hold released (voided): pending back to zero
# Only the hot account's entries matter to the reads; each transaction has two entries.
_GENERATE = """
WITH s AS (
    SELECT i, gen_random_uuid() AS id, $3::timestamptz + i * interval '1 millisecond' AS at,
           CASE WHEN i % 5 = 4 THEN 'pending' WHEN i % 5 = 0 THEN 'released' ELSE 'posted' END AS kind,
           -- running totals after transaction i, in closed form
           (i / 5 * 3 + least(i % 5, 3)) * {amount} AS posted,
           CASE WHEN i % 5 = 4 THEN {amount} ELSE 0 END AS pending
    FROM generate_series($1::bigint, $2::bigint) AS i
), t AS (
    INSERT INTO transactions (id, tenant_id, kind, posted_at, hash, hold_id)
    SELECT id, $4, CASE kind WHEN 'posted' THEN 'standard' WHEN 'pending' THEN 'hold_placed' ELSE 'hold_voided' END,
           at, sha256(id::text::bytea), CASE WHEN kind = 'posted' THEN NULL ELSE id END
    FROM s
)
INSERT INTO entries (transaction_id, entry_index, tenant_id, account_id, account_version, direction, kind, amount,
                     currency, posted_at, posted_debits, posted_credits, pending_debits, pending_credits)
SELECT id, 0, $4, $5::uuid, i, 'credit', kind, {amount}, 'EUR', at, 0, posted, 0, pending FROM s
UNION ALL
SELECT id, 1, $4, $6::uuid, i, 'debit', kind, {amount}, 'EUR', at, posted, 0, pending, 0 FROM s
""".format(amount=AMOUNT)


def expected(instant: datetime, entries: int) -> tuple[int, int, int]:
    """(posted, pending, available) of the hot (credit-normal) account at `instant`."""
    i = min(entries, max(0, (instant - START) // timedelta(milliseconds=1)))
    posted = (i // 5 * 3 + min(i % 5, 3)) * AMOUNT
    pending_credit = AMOUNT if i % 5 == 4 else 0
    return posted, posted + pending_credit, posted  # a pending credit is not spendable yet


async def generate(admin_url: str, *, tenant: str, hot: str, counter: str, entries: int) -> float:
    conn = await asyncpg.connect(plain_url(admin_url))
    started = time.perf_counter()
    try:
        for first in range(1, entries + 1, CHUNK):
            last = min(entries, first + CHUNK - 1)
            async with conn.transaction():
                await conn.execute(_GENERATE, first, last, START, tenant, hot, counter)
        posted, pending, _ = expected(START + timedelta(milliseconds=entries), entries)
        await conn.execute(
            "UPDATE balances SET posted_credits = $2, pending_credits = $3, version = $4, last_posted_at = $5 "
            "WHERE account_id = $1::uuid", hot, posted, pending - posted, entries,
            START + timedelta(milliseconds=entries))
        await conn.execute(
            "UPDATE balances SET posted_debits = $2, pending_debits = $3, version = $4, last_posted_at = $5 "
            "WHERE account_id = $1::uuid", counter, posted, pending - posted, entries,
            START + timedelta(milliseconds=entries))
        await conn.execute("ANALYZE entries")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def direct(url: str, *, tenant: str, hot: str, entries: int, samples: int = 3000) -> str:
    """The same lookup straight over asyncpg (no HTTP, no auth): the floor under the API's
    latency, and the plan that shows it is one index probe whatever the history's size."""
    from services.ledger.repository import _BALANCE_AS_OF

    sql = str(_BALANCE_AS_OF).replace(":as_of", "$3").replace(":account_id", "$1::uuid").replace(":tenant_id", "$2")
    conn = await asyncpg.connect(plain_url(url))
    try:
        plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, hot, tenant,
                                START + timedelta(milliseconds=entries // 2))
        rng = random.Random(4)
        timings = []
        for _ in range(samples):
            instant = START + timedelta(milliseconds=rng.uniform(0, entries))
            began = time.perf_counter()
            await conn.fetchrow(sql, hot, tenant, instant)
            timings.append(time.perf_counter() - began)
        timings.sort()
        lines = [f"  same lookup over asyncpg directly: p50 {timings[len(timings) // 2] * 1000:.2f} ms, "
                 f"p99 {timings[int(len(timings) * 0.99)] * 1000:.2f} ms; plan:"]
        lines += ["    " + row[0] for row in plan]
        return "\n".join(lines)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--no-tracing", action="store_true")
    args = parser.parse_args()
    use_uvloop()
    with embedded_ledger("asof") as platform, \
            ledger_api(platform, tracing=not args.no_tracing) as (host, port, api_pid):
        tenant = "asof-tenant"
        auth = bearer(platform, tenant, scopes=("ledger:read", "ledger:write"))

        async def accounts() -> tuple[str, str]:
            opened = []
            for name in ("hot", "counter"):
                status, account = await call(host, port, auth, "POST", "/v1/ledger/accounts", {
                    "name": name, "currency": "EUR", "normal_balance": "credit", "allow_negative": name == "counter"})
                assert status == 201, account
                opened.append(account["id"])
            return opened[0], opened[1]

        hot, counter = asyncio.run(accounts())
        # The owner role writes the history (the service role would, one request at a time).
        seconds = asyncio.run(generate(platform.db.owner_url, tenant=tenant, hot=hot, counter=counter,
                                       entries=args.entries))
        print(f"ledger_as_of: generated {args.entries:,} entries on the hot account "
              f"({2 * args.entries:,} in all) in {seconds:.0f}s")

        rng = random.Random(3)
        span_ms = args.entries + 1000
        wrong: list[str] = []
        asked: dict[tuple[int, int], datetime] = {}
        per_client = args.requests // args.clients

        def request(client: int, sequence: int):
            instant = START + timedelta(milliseconds=rng.uniform(-500, span_ms))
            asked[(client, sequence)] = instant
            as_of = instant.isoformat().replace("+00:00", "Z")
            return "GET", f"/v1/ledger/accounts/{hot}/balance?as_of={as_of}", {"Authorization": auth}, b""

        def answered(client: int, sequence: int, status: int, body: bytes) -> None:
            if status != 200:
                return
            answer = orjson.loads(body)
            want = expected(asked[(client, sequence)], args.entries)
            if (answer["posted"], answer["pending"], answer["available"]) != want and len(wrong) < 5:
                wrong.append(f"as_of {asked[(client, sequence)].isoformat()}: got "
                             f"{(answer['posted'], answer['pending'], answer['available'])}, expected {want}")

        meter = CpuMeter(platform, api_pid)
        meter.start()
        run = asyncio.run(load(host, port, clients=args.clients, duration=0, warmup=0, make_request=request,
                               on_response=answered, requests_per_client=per_client, expect=frozenset({200})))
        cpu = meter.stop(run.answered).replace("per transaction", "per request")
        print(f"  GET balance?as_of=<random instant>, {args.clients} client(s): " + run.summary())
        print("  " + cpu)
        print(f"  answers checked against the closed form: {'all right' if not wrong else 'WRONG'}"
              + "".join(f"\n    {w}" for w in wrong))
        for error in run.errors:
            print("  error:", error)
        print(asyncio.run(direct(platform.db.app_url, tenant=tenant, hot=hot, entries=args.entries)))


if __name__ == "__main__":
    main()
