"""Benchmark: `POST /v1/payments` straight to the payments service (no gateway).

    .venv/bin/python bench/payments_create.py [--clients 32] [--seconds 20] [--workers 1] [--traces file|none]

Starts an embedded PostgreSQL with a migrated payments database and the payments API as
a real uvicorn process (`clearhouse serve payments --role api`), then runs `--clients`
concurrent clients, each creating payments back to back with a fresh Idempotency-Key and
a signed internal token, as the gateway would send them. Reports throughput of 201s and
latency percentiles over the measured window (after a warm-up), then checks that every
201 is one stored payment with its event and encrypted payee. Target: >= 500 payments/s
with 32 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import orjson

from payments_common import (  # noqa: I001
    Connection, cpu_seconds, embedded_platform, host_port, load_average, payments_api, postmaster_pid, summary,
)

import asyncpg

from shared.auth import sign_internal_token
from shared.db import plain_url

BODY = {"amount": 12_345, "currency": "EUR", "debit_account_id": "acct_bench",
        "payee": {"name": "Jane Q Doe", "iban": "DE89370400440532013000"}, "reference": "bench"}


async def load(url: str, private_pem: str, *, clients: int, seconds: float, warmup: float,
               pids: tuple[int, int]) -> dict:
    tokens = {}

    def token(client: int) -> str:
        # The gateway signs per request; reusing one for a few seconds measures the service.
        now = time.monotonic()
        stamp, value = tokens.get(client, (0.0, ""))
        if now - stamp > 20:
            value = sign_internal_token(private_pem, tenant_id="bench", principal=f"client-{client}",
                                        scopes=["payments:write"], request_id=uuid.uuid4().hex, ttl_s=60)
            tokens[client] = (now, value)
        return value

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    created: list[str] = []
    started = time.monotonic()
    measure_from, stop_at = started + warmup, started + warmup + seconds
    host, port = host_port(url)

    async def client(n: int) -> None:
        connection = Connection(host, port)
        try:
            while (now := time.monotonic()) < stop_at:
                body = orjson.dumps({**BODY, "reference": f"bench {n}"})
                status, payload = await connection.post("/v1/payments", body, {
                    "Authorization": f"Bearer {token(n)}", "Idempotency-Key": uuid.uuid4().hex,
                    "Content-Type": "application/json"})
                done = time.monotonic()
                if now >= measure_from:
                    latencies.append(done - now)
                    statuses[status] = statuses.get(status, 0) + 1
                if status == 201:
                    created.append(orjson.loads(payload)["id"])
        finally:
            await connection.close()

    async def meter() -> dict:
        await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
        before = [cpu_seconds(pid) for pid in pids]
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        return {"cpu": [cpu_seconds(pid) - b for pid, b in zip(pids, before)]}

    *_, used = await asyncio.gather(*(client(n) for n in range(clients)), meter())
    return {"latencies": latencies, "statuses": statuses, "created": created, "seconds": seconds, **used}


async def check(app_url: str, created: list[str]) -> None:
    conn = await asyncpg.connect(plain_url(app_url))
    try:
        stored = await conn.fetchval("SELECT count(*) FROM payments WHERE tenant_id = 'bench'")
        vaulted = await conn.fetchval("SELECT count(*) FROM payee_vault WHERE tenant_id = 'bench'")
        events = await conn.fetchval("SELECT count(*) FROM events WHERE type = 'payment.created.v1'")
    finally:
        await conn.close()
    assert stored == vaulted == events == len(created) == len(set(created)), (stored, vaulted, events, len(created))
    print(f"check: {stored} payments stored, each with its payment.created event and encrypted payee")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--traces", choices=["file", "none"], default="file",
                        help="file: the platform default (spans exported to files); none: tracing off")
    args = parser.parse_args()
    with embedded_platform() as platform:
        env = {"OTEL_TRACES_EXPORTER": args.traces}
        with payments_api(platform, workers=args.workers, extra_env=env) as (url, api_pid):
            result = asyncio.run(load(url, platform.private_pem, clients=args.clients, seconds=args.seconds,
                                      warmup=args.warmup, pids=(api_pid, postmaster_pid(platform))))
        ok = result["statuses"].get(201, 0)
        print(f"POST /v1/payments, {args.clients} clients, {args.workers} API worker(s), traces={args.traces}, "
              f"{args.seconds:.0f} s measured, load average at the end {load_average()}")
        print(f"throughput: {ok / args.seconds:.0f} payments/s ({ok} created; statuses {result['statuses']})")
        print(f"latency: {summary(result['latencies'])}")
        api_cpu, pg_cpu = result["cpu"]
        print(f"cost: API {api_cpu / max(ok, 1) * 1000:.2f} ms CPU per payment, "
              f"PostgreSQL {pg_cpu / max(ok, 1) * 1000:.2f} ms CPU per payment")
        asyncio.run(check(platform.app_url, result["created"]))


if __name__ == "__main__":
    main()
