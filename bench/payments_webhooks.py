"""Benchmark: processor webhook ingestion, 30% duplicates, zero double transitions.

    .venv/bin/python bench/payments_webhooks.py [--payments 3000] [--clients 32] [--duplicates 0.3] [--workers 1]

Starts an embedded PostgreSQL with a migrated payments database and the payments API as
a real uvicorn process, and puts `--payments` payments in `submitted` state through the
service's own use cases. Then it delivers, from `--clients` concurrent senders and in a
shuffled order, two signed webhooks per payment (`payout.processing`, `payout.settled`)
plus a `--duplicates` share of re-deliveries of the same events (same event ids), the way
a processor retries. Reports throughput and latency, then checks that every payment
settled exactly once (one payment.settled event, no double transition anywhere), that
every distinct event id was recorded once, and `verify()` of the whole database.
Target: >= 1,000 webhooks/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid
from collections import Counter

import orjson

from payments_common import (  # noqa: I001
    WEBHOOK_SECRET, Connection, cpu_seconds, embedded_platform, host_port, load_average, payments_api,
    postmaster_pid, summary,
)

import asyncpg

from shared.db import plain_url

URL = "/v1/payments/webhooks/sandbox"


async def submitted_payments(platform, count: int) -> list[tuple[str, str, str]]:
    """(payment id, attempt id, payout id) of `count` payments the processor accepted,
    moved there by the service's use cases in batches."""
    os.environ.update(platform.env)
    from services.payments import service
    from services.payments.connector import ProcessorObject, ProcessorUpdate
    from services.payments.crypto import cipher_from_settings
    from services.payments.domain import ProcessorState
    from services.payments.schemas import ApprovalDecided, HoldPlaced, PaymentCreate
    from services.payments.settings import Settings
    from shared import context
    from shared.db import make_engine, make_sessionmaker
    from shared.uow import run_in_transaction

    settings = Settings()
    cipher = cipher_from_settings(settings)
    engine = make_engine(settings.database_url, pool_size=4)
    sessionmaker = make_sessionmaker(engine)
    request = PaymentCreate.model_validate({
        "amount": 10_000, "currency": "EUR", "debit_account_id": "acct_bench",
        "payee": {"name": "Jane Q Doe", "iban": "DE89370400440532013000"}, "reference": "bench"})
    context.start(tenant_id="bench", actor="user:bench", correlation_id="bench-setup")
    made: list[tuple[str, str, str]] = []
    try:
        for start in range(0, count, 250):
            size = min(250, count - start)

            async def create(uow):
                return [str((await service.create_payment(uow=uow, cipher=cipher, tenant_id="bench",
                                                          created_by="bench", request=request)).id)
                        for _ in range(size)]

            ids = await run_in_transaction(sessionmaker, create)

            async def approve_and_reserve(uow):
                for pid in ids:
                    decided = ApprovalDecided(approval_id=f"a{pid}", payment_id=pid)
                    await service.record_approval_granted(uow=uow, tenant_id="bench", actor="system:policy",
                                                          decided=decided)
                    await service.record_hold_placed(uow=uow, tenant_id="bench",
                                                     hold=HoldPlaced(hold_id=f"h{pid}", payment_id=pid))

            await run_in_transaction(sessionmaker, approve_and_reserve)
            async with sessionmaker() as session:
                from sqlalchemy import text

                attempts = dict((str(r[0]), str(r[1])) for r in await session.execute(
                    text("SELECT payment_id, id FROM processor_attempts WHERE payment_id = ANY(CAST(:ids AS uuid[]))"),
                    {"ids": ids}))

            async def accept(uow):
                for pid in ids:
                    found = ProcessorObject(kind="payout", processor_object_id=f"po_{pid[:18]}",
                                            request_id=uuid.UUID(attempts[pid]), state=ProcessorState.PROCESSING)
                    await service.apply_processor_update(uow=uow, actor="job:submitter", update=ProcessorUpdate(
                        processor="sandbox", event_id=f"submit:{pid}", event_type="payout.accepted", object=found))

            await run_in_transaction(sessionmaker, accept)
            made += [(pid, attempts[pid], f"po_{pid[:18]}") for pid in ids]
    finally:
        await engine.dispose()
    return made


def webhook(attempt_id: str, payout_id: str, status: str) -> bytes:
    return orjson.dumps({
        "id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": f"payout.{status}", "created": int(time.time()),
        "data": {"object": {"id": payout_id, "object": "payout", "request_id": attempt_id, "status": status,
                            "amount": 10_000, "currency": "EUR", "failure_code": None,
                            "value_date": "2025-01-31" if status == "settled" else None}}})


def signature(body: bytes) -> str:
    import hashlib
    import hmac

    stamp = int(time.time())
    digest = hmac.new(WEBHOOK_SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


async def deliver(url: str, bodies: list[bytes], clients: int, *, forged: bool = False,
                  ) -> tuple[float, list[float], Counter]:
    queue = list(reversed(bodies))
    latencies: list[float] = []
    outcomes: Counter = Counter()
    host, port = host_port(url)

    async def sender() -> None:
        connection = Connection(host, port)
        try:
            while queue:
                body = queue.pop()
                started = time.monotonic()
                signed = "t=0,v1=forged" if forged else signature(body)
                status, payload = await connection.post(URL, body, {
                    "Clearhouse-Signature": signed, "Content-Type": "application/json"})
                latencies.append(time.monotonic() - started)
                outcomes[orjson.loads(payload)["outcome"] if status == 200 else f"http_{status}"] += 1
        finally:
            await connection.close()

    started = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(clients)))
    return time.monotonic() - started, latencies, outcomes


async def check(app_url: str, payments: int) -> list[str]:
    from services.payments.verify import verify

    conn = await asyncpg.connect(plain_url(app_url))
    try:
        settled = await conn.fetchval("SELECT count(*) FROM payments WHERE status = 'settled'")
        doubles = await conn.fetchval(
            "SELECT count(*) FROM (SELECT aggregate_id FROM events WHERE type IN ('payment.settled.v1', "
            "'payment.submitted.v1') GROUP BY aggregate_id, type HAVING count(*) > 1) d")
        recorded = await conn.fetchval("SELECT count(*) FROM processor_webhook_events WHERE event_id LIKE 'evt_%'")
    finally:
        await conn.close()
    print(f"check: {settled}/{payments} payments settled, {doubles} double transitions, "
          f"{recorded} distinct webhook events recorded")
    return await verify(app_url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duplicates", type=float, default=0.3, help="share of deliveries that are re-deliveries")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--traces", choices=["file", "none"], default="file")
    parser.add_argument("--floor", action="store_true",
                        help="also send the same number of forged webhooks (401, no database work) first: the "
                             "cost of the HTTP stack alone, for comparison")
    args = parser.parse_args()
    rng = random.Random(7)
    with embedded_platform() as platform:
        print(f"setting up {args.payments} submitted payments…", flush=True)
        made = asyncio.run(submitted_payments(platform, args.payments))
        unique = [webhook(a, p, s) for _, a, p in made for s in ("processing", "settled")]
        duplicates = round(len(unique) * args.duplicates / (1 - args.duplicates))
        bodies = unique + [rng.choice(unique) for _ in range(duplicates)]
        rng.shuffle(bodies)
        env = {"OTEL_TRACES_EXPORTER": args.traces}
        with payments_api(platform, workers=args.workers, extra_env=env) as (url, api_pid):
            pids = (api_pid, postmaster_pid(platform))
            if args.floor:
                before = cpu_seconds(api_pid)
                floor_elapsed, _, floor_outcomes = asyncio.run(deliver(url, bodies, args.clients, forged=True))
                print(f"floor: {len(bodies) / floor_elapsed:.0f} forged webhooks/s answered {dict(floor_outcomes)}, "
                      f"API {(cpu_seconds(api_pid) - before) / len(bodies) * 1000:.2f} ms CPU each")
            before = [cpu_seconds(pid) for pid in pids]
            elapsed, latencies, outcomes = asyncio.run(deliver(url, bodies, args.clients))
            api_cpu, pg_cpu = (cpu_seconds(pid) - b for pid, b in zip(pids, before))
        print(f"webhooks: {len(bodies)} delivered ({len(unique)} distinct, {duplicates} re-deliveries = "
              f"{duplicates / len(bodies):.0%}), {args.clients} senders, {args.workers} API worker(s), "
              f"traces={args.traces}, load average at the end {load_average()}")
        print(f"throughput: {len(bodies) / elapsed:.0f} webhooks/s in {elapsed:.1f} s; outcomes {dict(outcomes)}")
        print(f"latency: {summary(latencies)}")
        print(f"cost: API {api_cpu / len(bodies) * 1000:.2f} ms CPU per webhook, "
              f"PostgreSQL {pg_cpu / len(bodies) * 1000:.2f} ms CPU per webhook")
        problems = asyncio.run(check(platform.app_url, args.payments))
        print("verify: " + ("all invariants hold" if not problems else f"{len(problems)} problems: {problems[:5]}"))


if __name__ == "__main__":
    main()
