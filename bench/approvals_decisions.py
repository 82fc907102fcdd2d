"""Approvals decisions benchmark: `POST /v1/approvals/{id}/decisions` through a real
uvicorn process of the approvals API (`clearhouse serve approvals --role api`, as
`clearhouse up` runs it, traces exported to files), on the embedded PostgreSQL, with 32
concurrent clients.

Setup files pending requests that need two approvals (`POST /v1/approvals`, 10,000.00 EUR
under the default policy). Each client then works a shared queue of decisions in which
the two approvals of one request sit next to each other, so two clients often decide the
same request at the same moment and meet on its row lock, as approvers working one queue
do. Every request carries an Idempotency-Key and a fresh internal token's principal.

    .venv/bin/python -m bench.approvals_decisions [--requests 3000] [--clients 32] [--without-idempotency-key]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import psutil

from bench._platform import embedded_pair, percentile
from clearhouse.embedded import free_port
from clearhouse.provision import provision_database
from services.approvals.api import MIGRATIONS
from shared import migrate
from shared.auth import generate_keypair, sign_internal_token

ROOT = Path(__file__).resolve().parent.parent
TENANT = "bench-tenant"
APPROVERS = [f"approver-{i}" for i in range(64)]


def bearer(private_pem: str, principal: str, scopes: list[str]) -> dict[str, str]:
    token = sign_internal_token(private_pem, tenant_id=TENANT, principal=principal, scopes=scopes,
                                request_id=uuid.uuid4().hex, ttl_s=3600)
    return {"Authorization": f"Bearer {token}"}


def start_api(*, database_url: str, bootstrap: str, public_pem: str, port: int, workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "DATABASE_URL": database_url, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "INTERNAL_TOKEN_PUBLIC_KEY": public_pem, "CLEARHOUSE_TRACES_DIR": str(workdir / "traces"),
           "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    log = (workdir / "approvals-api.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "clearhouse", "serve", "approvals", "--role", "api",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(client: httpx.AsyncClient, process: subprocess.Popen) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise SystemExit("the approvals API exited; see its log")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("the approvals API did not become ready")


async def file_requests(client: httpx.AsyncClient, private_pem: str, count: int, clients: int) -> list[str]:
    headers = bearer(private_pem, "filer", ["approvals:request"])
    ids: list[str] = []

    async def worker(numbers: range) -> None:
        for n in numbers:
            response = await client.post("/v1/approvals", headers={**headers, "Idempotency-Key": f"file-{n}"},
                                         json={"subject_type": "vendor_payout", "subject_id": f"payout-{n}",
                                               "amount": 1_500_000, "currency": "EUR"})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])

    await asyncio.gather(*(worker(range(i, count, clients)) for i in range(clients)))
    return ids


async def decide_all(client: httpx.AsyncClient, private_pem: str, approval_ids: list[str], clients: int,
                     idempotency_keys: bool) -> tuple[list[float], Counter, float]:
    tokens = {p: bearer(private_pem, p, ["approvals:decide"]) for p in APPROVERS}
    queue: asyncio.Queue = asyncio.Queue()
    for n, approval_id in enumerate(approval_ids):
        first, second = APPROVERS[n % len(APPROVERS)], APPROVERS[(n + 1) % len(APPROVERS)]
        queue.put_nowait((approval_id, first))
        queue.put_nowait((approval_id, second))
    latencies: list[float] = []
    statuses: Counter = Counter()

    async def worker() -> None:
        while not queue.empty():
            approval_id, principal = queue.get_nowait()
            headers = dict(tokens[principal])
            if idempotency_keys:
                headers["Idempotency-Key"] = f"{approval_id}-{principal}"
            started = time.perf_counter()
            response = await client.post(f"/v1/approvals/{approval_id}/decisions", headers=headers,
                                         json={"decision": "approve", "reason": "checked against the invoice"})
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, statuses, time.perf_counter() - started


async def main(requests: int, clients: int, warmup: int, idempotency_keys: bool) -> None:
    private_pem, public_pem = generate_keypair()
    with embedded_pair() as (pg, broker):
        workdir = pg.data_dir.parent
        db = await provision_database(pg.url(), "bench_approvals_api")
        await asyncio.to_thread(migrate.upgrade, MIGRATIONS, db.owner_url, db.app_role)
        port = free_port()
        api = start_api(database_url=db.app_url, bootstrap=broker.bootstrap, public_pem=public_pem, port=port,
                        workdir=workdir)
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as client:
                await wait_ready(client, api)
                filed_at = time.perf_counter()
                approval_ids = await file_requests(client, private_pem, requests + warmup, clients)
                filed = time.perf_counter() - filed_at
                await decide_all(client, private_pem, approval_ids[:warmup], clients, idempotency_keys)
                server = psutil.Process(api.pid)
                cpu_before = server.cpu_times()
                latencies, statuses, elapsed = await decide_all(client, private_pem, approval_ids[warmup:], clients,
                                                                idempotency_keys)
                cpu_after = server.cpu_times()
                check = await client.get("/v1/approvals", params={"status": "pending", "limit": 1},
                                         headers=bearer(private_pem, "auditor", ["approvals:read"]))
                still_pending = len(check.json()["data"])
        finally:
            api.terminate()
            api.wait(10)
    decisions = len(latencies)
    server_cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    print(f"filed {requests + warmup} approval requests in {filed:.1f}s = {(requests + warmup) / filed:,.0f}/s "
          f"({clients} clients)")
    keys = "with" if idempotency_keys else "without"
    print(f"decisions ({keys} Idempotency-Key): {decisions} by {clients} concurrent clients in {elapsed:.1f}s = {decisions / elapsed:,.0f}/s; "
          f"latency p50 {1000 * percentile(latencies, 50):.1f} ms, p95 {1000 * percentile(latencies, 95):.1f} ms, "
          f"p99 {1000 * percentile(latencies, 99):.1f} ms; statuses {dict(sorted(statuses.items()))}; "
          f"{requests} requests granted, {still_pending} still pending")
    print(f"API process CPU: {1e3 * server_cpu / decisions:.2f} ms per decision ({server_cpu / elapsed:.0%} of a core); "
          f"machine: {psutil.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="approval requests to decide (two decisions each)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=200, help="requests decided before measuring")
    parser.add_argument("--without-idempotency-key", action="store_true",
                        help="decide without Idempotency-Key (saves the key's own transaction per decision)")
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.clients, args.warmup, not args.without_idempotency_key))
