"""Timeline composition: `GET /v1/payments/{id}/timeline` through the gateway, which asks
payments whether the payment is the caller's and all four services for their events,
concurrently, and merges them. Open loop at a fixed rate (latency counted from each
request's scheduled time, so a slow answer cannot hide the ones queued behind it).

    .venv/bin/python -m bench.gateway_timeline [--rate 50] [--seconds 30]

Target: p99 ≤ 50 ms at 50 requests/s. The four services and the gateway run as their own
uvicorn processes on the embedded PostgreSQL; the payment is created through the gateway
and each other service's event log holds two events about it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid
from datetime import datetime, timedelta

import asyncpg

from bench.gateway_harness import QUIET, Connection, database, open_loop, platform, request_bytes
from clearhouse.embedded import free_port
from gateway.keys import create_key
from shared.auth import generate_keypair
from shared.db import plain_url

SERVICES = ("payments", "approvals", "ledger", "reconciliation")
PAYMENT = {"amount": 12_500, "currency": "EUR", "debit_account_id": "acc-1",
           "payee": {"name": "Ada Lovelace", "iban": "DE89370400440532013000"}, "reference": "invoice 42"}


async def seed_events(db, tenant: str, payment_id: str, service: str, start: datetime) -> None:
    conn = await asyncpg.connect(plain_url(db.owner_url))
    try:
        for n in range(2):
            await conn.execute(
                "INSERT INTO events (id, tenant_id, aggregate_type, aggregate_id, type, schema_version, payload, "
                "actor, correlation_id, traceparent, occurred_at) VALUES ($1, $2, 'bench', $3, $4, 1, $5::jsonb, "
                "$6, 'corr', $7, $8)",
                uuid.uuid4(), tenant, str(uuid.uuid4()), f"{service}.bench_step.v1",
                json.dumps({"payment_id": payment_id, "step": n}), f"service:{service}",
                f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01", start + timedelta(seconds=n + 1))
    finally:
        await conn.close()


async def main(rate: float, seconds: float) -> None:
    with platform() as (admin_url, processes, workdir):
        private_pem, public_pem = generate_keypair()
        databases = {s: await database(admin_url, s) for s in SERVICES}
        gateway_db = await database(admin_url, "gateway")
        env = {}
        for service in SERVICES:
            url = processes.uvicorn(service, f"services.{service}.api:create_app", free_port(), {
                **QUIET, "DATABASE_URL": databases[service].app_url, "INTERNAL_TOKEN_PUBLIC_KEY": public_pem,
                "CLEARHOUSE_HOME": str(workdir)})
            env[f"{service.upper()}_URL"] = url
        gateway_port = free_port()
        processes.uvicorn("gateway", "gateway.api:create_app", gateway_port, {
            **QUIET, **env, "DATABASE_URL": gateway_db.app_url, "INTERNAL_TOKEN_PRIVATE_KEY": private_pem,
            "RATE_LIMIT_PER_S": "1000000", "RATE_LIMIT_BURST": "1000000"})
        tenant = "bench"
        key = await create_key(gateway_db.owner_url, tenant=tenant, principal="bench",
                               scopes=["payments:read", "payments:write"])
        auth = {"Authorization": f"Bearer {key}"}
        conn = await Connection.open(gateway_port)
        status, body = await conn.exchange(request_bytes(
            "POST", "/v1/payments", {**auth, "Content-Type": "application/json", "Idempotency-Key": "bench-1"},
            json.dumps(PAYMENT).encode()))
        conn.close()
        assert status == 201, body
        payment = json.loads(body)
        start = datetime.fromisoformat(payment["created_at"])
        for service in SERVICES[1:]:
            await seed_events(databases[service], tenant, payment["id"], service, start)

        request = request_bytes("GET", f"/v1/payments/{payment['id']}/timeline", auth)
        conn = await Connection.open(gateway_port)
        status, body = await conn.exchange(request)
        conn.close()
        answer = json.loads(body)
        assert status == 200 and len(answer["events"]) == 7 and not answer["partial"], body

        await open_loop(gateway_port, lambda: request, rate=rate, seconds=3, expect=200)  # warm-up
        cpu_before = processes.cpu_seconds("gateway")
        result = await open_loop(gateway_port, lambda: request, rate=rate, seconds=seconds, expect=200)
        cpu = (processes.cpu_seconds("gateway") - cpu_before) / max(1, len(result.latencies)) * 1000
        print(f"timeline, 4 upstreams, 7 events, open loop {rate:g} req/s for {seconds:g} s: "
              f"{len(result.latencies)} answered 200, errors {result.errors or 'none'}")
        print(f"  p50 {result.pct(50):.2f} ms  p90 {result.pct(90):.2f} ms  p99 {result.pct(99):.2f} ms  "
              f"max {result.pct(100):.2f} ms  | gateway CPU {cpu:.2f} ms/request")
        print(f"  load average {os.getloadavg()[0]:.2f} (2 cores); target p99 ≤ 50 ms: "
              f"{'met' if result.pct(99) <= 50 else 'MISSED'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(main(args.rate, args.seconds))
