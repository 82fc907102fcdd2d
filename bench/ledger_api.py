"""Benchmark: one 2-leg transaction per request through the ledger API (Idempotency-Key,
outbox event, balance locks and the deferred balance check included), 32 concurrent
clients against a real uvicorn process and the embedded PostgreSQL.

    .venv/bin/python bench/ledger_api.py [--clients 32] [--duration 20] [--accounts 1000]
                                         [--workers 1] [--no-tracing]

Prints throughput and latency percentiles, then checks the ledger with `verify`.
Target (issue 3): ≥ 1,300 transactions/s with p99 ≤ 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid

from ledger_common import CpuMeter, bearer, call, embedded_ledger, json_body, ledger_api, load, use_uvloop

from services.ledger.verify import verify


async def open_accounts(host: str, port: int, auth: str, count: int) -> list[str]:
    sem = asyncio.Semaphore(16)

    async def one(number: int) -> str:
        async with sem:
            status, account = await call(host, port, auth, "POST", "/v1/ledger/accounts", {
                "name": f"bench-{number}", "currency": "EUR", "normal_balance": "credit", "allow_negative": True})
            assert status == 201, account
            return account["id"]

    return list(await asyncio.gather(*(one(n) for n in range(count))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pool-size", type=int, default=40,
                        help="DB_POOL_SIZE of the API: at least the concurrency, or the kit's overflow connections "
                             "are opened and closed per request")
    parser.add_argument("--no-tracing", action="store_true", help="OTEL_TRACES_EXPORTER=none in the API process")
    args = parser.parse_args()
    use_uvloop()
    with embedded_ledger("api") as platform, \
            ledger_api(platform, workers=args.workers, pool_size=args.pool_size,
                       tracing=not args.no_tracing) as (host, port, api_pid):
        auth = bearer(platform, "bench-tenant")
        accounts = asyncio.run(open_accounts(host, port, auth, args.accounts))
        rng = random.Random(1)

        def balanced(client: int, sequence: int):
            debit, credit = rng.sample(accounts, 2)
            amount = rng.randint(1, 10_000)
            body = json_body({"entries": [{"account_id": debit, "direction": "debit", "amount": amount},
                                          {"account_id": credit, "direction": "credit", "amount": amount}]})
            return ("POST", "/v1/ledger/transactions",
                    {"Authorization": auth, "Content-Type": "application/json",
                     "Idempotency-Key": f"{client}-{sequence}-{uuid.uuid4().hex[:8]}"}, body)

        meter = CpuMeter(platform, api_pid)
        meter.start()
        run = asyncio.run(load(host, port, clients=args.clients, duration=args.duration, warmup=args.warmup,
                               make_request=balanced, expect=frozenset({201})))
        cpu = meter.stop(run.answered)
        print(f"ledger_api: {args.clients} clients, {args.accounts} accounts, {args.workers} worker(s), "
              f"tracing {'off' if args.no_tracing else 'on'}")
        print("  " + run.summary("transactions"))
        print("  " + cpu)
        for error in run.errors:
            print("  error:", error)
        began = time.perf_counter()
        violations = asyncio.run(verify(platform.db.app_url))
        print(f"  verify: {len(violations)} violations in {time.perf_counter() - began:.1f}s"
              + "".join(f"\n    {v}" for v in violations[:10]))


if __name__ == "__main__":
    main()
