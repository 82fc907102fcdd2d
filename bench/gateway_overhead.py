"""Gateway overhead: the same GET and POST sent straight to the ledger service, through
nginx `proxy_pass` (the floor: what any reverse proxy costs), and through the gateway
(key verification, scope, rate limit, internal token, proxying), in one run, by the same
load generator.

    .venv/bin/python -m bench.gateway_overhead [--rounds 10] [--slice 1.0] [--concurrency 16]

Latency is measured one request at a time (p50/p99: what a single caller sees); throughput
with `--concurrency` keep-alive connections. The targets take turns in `--slice`-second
slices for `--rounds` rounds, so background load on a shared machine skews none of them
more than the others. CPU per request (user + system, from /proc) is printed for the
service and the proxy in front of it: the figure least disturbed by other work. Targets: p50 added by the gateway ≤ 2 ms and
gateway/direct throughput ≥ 0.6. Needs nginx (`apt-get install -y nginx`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import uuid

from bench.gateway_harness import (
    QUIET, Connection, Result, closed_loop, database, platform, request_bytes, start_nginx,
)
from clearhouse.embedded import free_port
from gateway.keys import create_key
from shared.auth import generate_keypair, sign_internal_token

TENANT, PRINCIPAL = "bench", "bench"


def merge(total: Result, part: Result) -> None:
    total.latencies.extend(part.latencies)
    total.seconds += part.seconds
    for status, count in part.errors.items():
        total.errors[status] = total.errors.get(status, 0) + count


async def main(rounds: int, slice_s: float, concurrency: int) -> None:
    with platform() as (admin_url, processes, _):
        ledger_db = await database(admin_url, "ledger")
        gateway_db = await database(admin_url, "gateway")
        private_pem, public_pem = generate_keypair()
        ledger_port, gateway_port = free_port(), free_port()
        ledger_url = processes.uvicorn("ledger", "services.ledger.api:create_app", ledger_port, {
            **QUIET, "DATABASE_URL": ledger_db.app_url, "INTERNAL_TOKEN_PUBLIC_KEY": public_pem})
        api_key = await create_key(gateway_db.owner_url, tenant=TENANT, principal=PRINCIPAL,
                                   scopes=["ledger:read", "ledger:write"])
        processes.uvicorn("gateway", "gateway.api:create_app", gateway_port, {
            **QUIET, "DATABASE_URL": gateway_db.app_url, "INTERNAL_TOKEN_PRIVATE_KEY": private_pem,
            "LEDGER_URL": ledger_url, "RATE_LIMIT_PER_S": "1000000", "RATE_LIMIT_BURST": "1000000"})
        nginx_port = int(start_nginx(processes, ledger_port).rsplit(":", 1)[1])
        # What the gateway would send: direct and nginx calls carry a signed internal token.
        token = sign_internal_token(private_pem, tenant_id=TENANT, principal=PRINCIPAL,
                                    scopes=["ledger:read", "ledger:write"], request_id="bench", ttl_s=3600)
        auth = {"direct": f"Bearer {token}", "nginx": f"Bearer {token}", "gateway": f"Bearer {api_key}"}
        ports = {"direct": ledger_port, "nginx": nginx_port, "gateway": gateway_port}  # the order of turns

        counter = itertools.count()

        def create_account(target: str):
            def make() -> bytes:
                n = next(counter)
                body = json.dumps({"name": f"bench account {n}", "currency": "EUR",
                                   "normal_balance": "credit"}).encode()
                return request_bytes("POST", "/v1/ledger/accounts", {
                    "Authorization": auth[target], "Content-Type": "application/json",
                    "Idempotency-Key": uuid.uuid4().hex}, body)
            return make

        conn = await Connection.open(ledger_port)
        status, body = await conn.exchange(create_account("direct")())
        conn.close()
        assert status == 201, body
        account_id = json.loads(body)["id"]

        def balance(target: str):
            request = request_bytes("GET", f"/v1/ledger/accounts/{account_id}/balance",
                                    {"Authorization": auth[target]})
            return lambda: request

        # The three targets take turns in short slices, round after round, so whatever else
        # runs on the machine meanwhile weighs on all three alike.
        rows = []
        for label, factory, expect in (("GET balance", balance, 200), ("POST account", create_account, 201)):
            makers = {target: factory(target) for target in ports}
            for target in ports:  # warm-up: pools, caches, first-use imports
                await closed_loop(ports[target], makers[target], concurrency=4, seconds=1.0, expect=expect)
            single = {t: Result([], 0.0, {}) for t in ports}
            loaded = {t: Result([], 0.0, {}) for t in ports}
            cpu = {t: {} for t in ports}
            for _ in range(rounds):
                for target in ports:
                    part = await closed_loop(ports[target], makers[target], concurrency=1, seconds=slice_s,
                                             expect=expect)
                    merge(single[target], part)
                for target in ports:
                    proxy = {"direct": None, "nginx": "nginx", "gateway": "gateway"}[target]
                    before = {n: processes.cpu_seconds(n) for n in ("ledger", proxy) if n}
                    part = await closed_loop(ports[target], makers[target], concurrency=concurrency,
                                             seconds=slice_s, expect=expect)
                    merge(loaded[target], part)
                    for n, value in before.items():
                        cpu[target][n] = cpu[target].get(n, 0.0) + processes.cpu_seconds(n) - value
            for target in ports:
                one, many = single[target], loaded[target]
                if one.errors or many.errors:
                    print(f"  {label} {target}: unexpected answers {one.errors or many.errors}")
                per_request = {n: total / max(1, len(many.latencies)) * 1000 for n, total in cpu[target].items()}
                rows.append((label, target, one.pct(50), one.pct(99), many.throughput, many.pct(50), many.pct(99)))
                cpu_text = ", ".join(f"{n} {ms:.2f}" for n, ms in per_request.items())
                print(f"  {label:<13} {target:<8} p50 {one.pct(50):6.2f} ms  p99 {one.pct(99):6.2f} ms  "
                      f"| c={concurrency}: {many.throughput:7.0f} req/s, p50 {many.pct(50):6.2f} ms, "
                      f"p99 {many.pct(99):6.2f} ms | CPU ms/request: {cpu_text}", flush=True)

        print(f"\nload average during the run: {os.getloadavg()[0]:.2f} (2 cores; anything above ~1.5 means "
              f"other work shared the machine)")
        print("summary (target: p50 added ≤ 2 ms, throughput ratio ≥ 0.6)")
        for label in ("GET balance", "POST account"):
            by = {r[1]: r for r in rows if r[0] == label}
            direct, nginx, gateway = by["direct"], by["nginx"], by["gateway"]
            print(f"  {label:<13} gateway: +{gateway[2] - direct[2]:.2f} ms p50, "
                  f"throughput x{gateway[4] / direct[4]:.2f}   nginx: +{nginx[2] - direct[2]:.2f} ms p50, "
                  f"throughput x{nginx[4] / direct[4]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--slice", type=float, default=1.0, help="seconds per target per round and phase")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.slice, args.concurrency))
