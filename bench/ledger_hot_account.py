"""Benchmark: 200 concurrent writers on one hot account through the ledger API. Half of
the requests take money out of the hot account, half put it in; every writer has its
own counter-account. Every transaction serialises on the hot account's balance row.

    .venv/bin/python bench/ledger_hot_account.py [--writers 200] [--duration 20]

Prints throughput and latency, then checks that not one minor unit is wrong: the hot
account's balance equals its opening balance plus what the 201-answered requests moved
(the client's own book), every entry's running balance is right, there is one entry per
confirmed transaction, and `verify` finds nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from ledger_common import CpuMeter, bearer, call, embedded_ledger, json_body, ledger_api, load, use_uvloop

from services.ledger.verify import verify

OPENING = 10**12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=200)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--pool-size", type=int, default=20,
                        help="DB_POOL_SIZE: for one hot row, fewer database connections queue better")
    parser.add_argument("--no-tracing", action="store_true")
    args = parser.parse_args()
    use_uvloop()
    with embedded_ledger("hot") as platform, \
            ledger_api(platform, pool_size=args.pool_size, tracing=not args.no_tracing) as (host, port, api_pid):
        auth = bearer(platform, "hot-tenant")

        async def setup() -> tuple[str, list[str]]:
            status, hot = await call(host, port, auth, "POST", "/v1/ledger/accounts",
                                     {"name": "hot", "currency": "EUR", "normal_balance": "credit"})
            status, funding = await call(host, port, auth, "GET", "/v1/ledger/accounts?kind=system&currency=EUR")
            funding_id = next(a["id"] for a in funding["data"] if a["system_code"] == "funding")
            status, _ = await call(host, port, auth, "POST", "/v1/ledger/transactions", {"entries": [
                {"account_id": funding_id, "direction": "debit", "amount": OPENING},
                {"account_id": hot["id"], "direction": "credit", "amount": OPENING}]})
            assert status == 201
            others = []
            for number in range(args.writers):
                status, account = await call(host, port, auth, "POST", "/v1/ledger/accounts", {
                    "name": f"writer-{number}", "currency": "EUR", "normal_balance": "credit",
                    "allow_negative": True})
                others.append(account["id"])
            return hot["id"], others

        hot, others = asyncio.run(setup())
        sent: dict[tuple[int, int], tuple[str, int]] = {}
        confirmed = {"in": 0, "out": 0, "count": 0}

        def answered(client: int, sequence: int, status: int, body: bytes) -> None:
            # The client's own book: only what the ledger confirmed with 201 counts.
            if status == 201:
                direction, amount = sent[(client, sequence)]
                confirmed[direction] += amount
                confirmed["count"] += 1

        def request(client: int, sequence: int):
            amount = 1 + (client * 7919 + sequence) % 1000
            direction = "out" if (client + sequence) % 2 else "in"
            debit, credit = (hot, others[client]) if direction == "out" else (others[client], hot)
            sent[(client, sequence)] = (direction, amount)
            return ("POST", "/v1/ledger/transactions",
                    {"Authorization": auth, "Content-Type": "application/json",
                     "Idempotency-Key": f"hot-{client}-{sequence}-{uuid.uuid4().hex[:6]}"},
                    json_body({"entries": [{"account_id": debit, "direction": "debit", "amount": amount},
                                           {"account_id": credit, "direction": "credit", "amount": amount}]}))

        meter = CpuMeter(platform, api_pid)
        meter.start()
        run = asyncio.run(load(host, port, clients=args.writers, duration=args.duration, warmup=args.warmup,
                               make_request=request, expect=frozenset({201}), on_response=answered))
        cpu = meter.stop(run.answered)
        print(f"ledger_hot_account: {args.writers} concurrent writers on one account, "
              f"tracing {'off' if args.no_tracing else 'on'}")
        print("  " + run.summary("transactions"))
        print("  " + cpu)
        for error in run.errors:
            print("  error:", error)

        async def check() -> None:
            # The ledger's own record of what happened, compared with its balance: the
            # entries on the hot account after the opening one, summed by direction.
            status, balance = await call(host, port, auth, "GET", f"/v1/ledger/accounts/{hot}/balance")
            total_in = total_out = count = 0
            cursor = None
            while True:
                path = f"/v1/ledger/accounts/{hot}/entries?limit=500" + (f"&cursor={cursor}" if cursor else "")
                status, page = await call(host, port, auth, "GET", path)
                for entry in page["data"]:
                    if entry["account_version"] == 1:
                        continue
                    count += 1
                    if entry["direction"] == "credit":
                        total_in += entry["amount"]
                    else:
                        total_out += entry["amount"]
                    expected_after = OPENING + total_in - total_out
                    if entry["balance_after"]["posted"] != expected_after:
                        print(f"  WRONG running balance at v{entry['account_version']}: "
                              f"{entry['balance_after']['posted']} ≠ {expected_after}")
                cursor = page["next_cursor"]
                if not cursor:
                    break
            expected = OPENING + confirmed["in"] - confirmed["out"]
            exact = balance["posted"] == expected == OPENING + total_in - total_out and count == confirmed["count"]
            print(f"  hot account: posted {balance['posted']:,}; client's book (201 answers) says {expected:,}; "
                  f"entries say {OPENING + total_in - total_out:,}; {count:,} entries for {confirmed['count']:,} "
                  f"confirmed transactions → {'EXACT' if exact else 'WRONG'}")

        asyncio.run(check())
        began = time.perf_counter()
        violations = asyncio.run(verify(platform.db.app_url))
        print(f"  verify: {len(violations)} violations in {time.perf_counter() - began:.1f}s"
              + "".join(f"\n    {v}" for v in violations[:10]))


if __name__ == "__main__":
    main()
