"""Benchmark: bulk posting through the ledger API (POST /v1/ledger/transactions/bulk,
all-or-nothing batches of 2-leg transactions, Idempotency-Key and one outbox event per
transaction included), against the ceiling of the same machine in the same run: a raw
asyncpg COPY of the same rows into the same indexed tables (triggers included).

    .venv/bin/python bench/ledger_bulk.py [--batch 1000] [--clients 3] [--duration 24] [--rounds 4]

Each client posts between its own 1,000 accounts (a tenant bulk-posting its own book),
so concurrent batches do not queue on each other's balance locks.
Target (issue 3): ≥ 10,000 transactions/s; the COPY ceiling here is about 24,000/s.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from datetime import datetime, timezone

import asyncpg
import orjson
from ledger_common import CpuMeter, Run, bearer, call, embedded_ledger, json_body, ledger_api, load, use_uvloop

from services.ledger.service import new_id
from shared.db import plain_url

ACCOUNTS_PER_CLIENT = 1000


async def open_accounts(host: str, port: int, auth: str, count: int) -> list[str]:
    sem = asyncio.Semaphore(16)

    async def one(number: int) -> str:
        async with sem:
            status, account = await call(host, port, auth, "POST", "/v1/ledger/accounts", {
                "name": f"bulk-{number}", "currency": "EUR", "normal_balance": "credit", "allow_negative": True})
            assert status == 201, account
            return account["id"]

    return list(await asyncio.gather(*(one(n) for n in range(count))))


# ── the ceiling: COPY of the same rows ───────────────────────────────────────────────


async def copy_baseline(url: str, *, accounts: list[str], tenant: str, batch: int, duration: float,
                        with_events: bool, versions: dict[str, int]) -> float:
    """Transactions/s for COPYing `batch` transactions (+ 2 entries each, + 1 outbox event
    each if `with_events`) per database transaction into the same tables, one writer."""
    conn = await asyncpg.connect(plain_url(url))
    rng = random.Random(2)
    posted = 0
    try:
        started = time.perf_counter()
        while time.perf_counter() - started < duration:
            now = datetime.now(timezone.utc)
            transactions, entries, events = [], [], []
            for _ in range(batch):
                transaction_id = new_id()
                debit, credit = rng.sample(accounts, 2)
                amount = rng.randint(1, 10_000)
                transactions.append((transaction_id, tenant, "standard", None, None, "{}", None, None, None, now,
                                     uuid.uuid4().bytes * 2))
                for index, (account, direction) in enumerate(((debit, "debit"), (credit, "credit"))):
                    versions[account] = versions.get(account, 0) + 1
                    entries.append((transaction_id, index, tenant, uuid.UUID(account), versions[account],
                                    direction, "posted", amount, "EUR", now, amount, 0, 0, 0))
                if with_events:
                    events.append((uuid.uuid4(), tenant, "transaction", str(transaction_id),
                                   "ledger.transaction.posted.v1", 1, orjson.dumps({
                                       "transaction_id": str(transaction_id), "entries": [
                                           {"account_id": debit, "direction": "debit", "amount": amount,
                                            "currency": "EUR"},
                                           {"account_id": credit, "direction": "credit", "amount": amount,
                                            "currency": "EUR"}]}).decode(), "user:bench", now))
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "transactions", records=transactions,
                    columns=["id", "tenant_id", "kind", "external_id", "description", "metadata", "reverses_id",
                             "hold_id", "payment_id", "posted_at", "hash"])
                await conn.copy_records_to_table(
                    "entries", records=entries,
                    columns=["transaction_id", "entry_index", "tenant_id", "account_id", "account_version",
                             "direction", "kind", "amount", "currency", "posted_at", "posted_debits",
                             "posted_credits", "pending_debits", "pending_credits"])
                if with_events:
                    await conn.copy_records_to_table(
                        "events", records=events,
                        columns=["id", "tenant_id", "aggregate_type", "aggregate_id", "type", "schema_version",
                                 "payload", "actor", "occurred_at"])
            posted += batch
        return posted / (time.perf_counter() - started)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--duration", type=float, default=24.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-tracing", action="store_true")
    args = parser.parse_args()
    use_uvloop()
    with embedded_ledger("bulk") as platform, \
            ledger_api(platform, workers=args.workers, tracing=not args.no_tracing) as (host, port, api_pid):
        auth = bearer(platform, "bulk-tenant")
        books = [asyncio.run(open_accounts(host, port, auth, ACCOUNTS_PER_CLIENT)) for _ in range(args.clients)]
        rngs = [random.Random(n) for n in range(args.clients)]

        def bulk(client: int, sequence: int):
            rng, accounts = rngs[client], books[client]
            items = []
            for _ in range(args.batch):
                debit, credit = rng.sample(accounts, 2)
                amount = rng.randint(1, 10_000)
                items.append({"entries": [{"account_id": debit, "direction": "debit", "amount": amount},
                                          {"account_id": credit, "direction": "credit", "amount": amount}]})
            return ("POST", "/v1/ledger/transactions/bulk",
                    {"Authorization": auth, "Content-Type": "application/json",
                     "Idempotency-Key": f"bulk-{client}-{sequence}-{uuid.uuid4().hex[:8]}"},
                    json_body({"transactions": items}))

        copy_tenant = "copy-tenant"
        copy_accounts = asyncio.run(open_accounts(host, port, bearer(platform, copy_tenant), ACCOUNTS_PER_CLIENT))
        versions: dict[str, int] = {}
        # Interleaved slices (API, COPY, COPY with events) so that all three see the same
        # machine: on a shared box the load moves faster than one long run.
        slice_s = args.duration / args.rounds
        api_posted = api_seconds = 0.0
        copy_rates: dict[bool, list[float]] = {False: [], True: []}
        latencies, statuses, errors = [], {}, []
        meter = CpuMeter(platform, api_pid)
        cpu_lines = []
        for round_number in range(args.rounds):
            meter.start()
            run = asyncio.run(load(host, port, clients=args.clients, duration=slice_s,
                                   warmup=args.warmup if round_number == 0 else 0.5, make_request=bulk,
                                   expect=frozenset({201})))
            cpu_lines.append(meter.stop(run.answered * args.batch))
            api_posted += len(run.latencies) * args.batch
            api_seconds += run.seconds
            latencies += run.latencies
            for status, count in run.statuses.items():
                statuses[status] = statuses.get(status, 0) + count
            errors += run.errors
            for with_events in (False, True):
                copy_rates[with_events].append(asyncio.run(copy_baseline(
                    platform.db.app_url, accounts=copy_accounts, tenant=copy_tenant, batch=args.batch,
                    duration=slice_s / 2, with_events=with_events, versions=versions)))
        summary = Run(latencies=latencies, statuses=statuses, started=0.0, finished=api_seconds)
        api_rate = api_posted / api_seconds
        print(f"ledger_bulk: batches of {args.batch}, {args.clients} clients, {args.workers} worker(s), "
              f"tracing {'off' if args.no_tracing else 'on'}, {args.rounds} interleaved rounds")
        print("  API:  " + summary.summary("transactions", per_request=args.batch))
        for line in cpu_lines:
            print("    " + line)
        for error in errors[:5]:
            print("  error:", error)
        journal = sum(copy_rates[False]) / len(copy_rates[False])
        outbox = sum(copy_rates[True]) / len(copy_rates[True])
        print(f"  COPY (transactions + entries):          {journal:,.0f} transactions/s → API at "
              f"{api_rate / journal:.0%} of it")
        print(f"  COPY (transactions + entries + events): {outbox:,.0f} transactions/s → API at "
              f"{api_rate / outbox:.0%} of it")


if __name__ == "__main__":
    main()
