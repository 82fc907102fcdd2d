"""One platform for the hostile-input and security suite: `clearhouse up` in a subprocess,
as a user runs it (every service, relay and consumer process, the sandbox, the gateway),
with instant settlement and a per-key rate limit high enough that 429s never hide what a
request would have done. Attackers, partners sending garbage and curious tenants all go
through the real gateway with real API keys; nothing here is mocked.

Every module uses this one platform (package-scoped: it stops once the last hostile test
has run, not at the end of the whole suite; starting one costs ~15-30 s), so each test
makes its own tenants and objects and never assumes an empty database.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from clearhouse.provision import service_urls
from gateway.keys import SCOPES, create_key, revoke_key
from tests.running import Up

SERVICES = ("payments", "approvals", "ledger", "reconciliation")
PLATFORM_ENV = {
    "SANDBOX_PROCESSING_DELAY_S": "0", "SANDBOX_SETTLE_DELAY_S": "0",
    "RATE_LIMIT_PER_S": "100000", "RATE_LIMIT_BURST": "100000",
    # The webhook tests hold a payment at `submitted` (NOWEBHOOK) and send its news
    # themselves: the janitor must not learn it by polling the sandbox first.
    "PAYMENTS_JANITOR_STUCK_AFTER_S": "900",
}


def iban(country: str, bban: str) -> str:
    """A valid IBAN (ISO 13616 check digits) for a made-up account number."""
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


@dataclass
class Hostile:
    home: Path
    gateway: str
    demo_key: str
    ports: dict[str, int]

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.ports['postgres']}/postgres"

    def database_url(self, component: str) -> str:
        """Superuser URL of one component's database: tests read what the services wrote."""
        return f"postgresql://postgres@127.0.0.1:{self.ports['postgres']}/clearhouse_{component}"

    def app_url(self, component: str) -> str:
        return service_urls(self.admin_url, f"clearhouse_{component}")[1]

    def service(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def private_pem(self) -> str:
        return (self.home / "keys" / "internal-token.pem").read_text()

    @property
    def webhook_secret(self) -> bytes:
        return (self.home / "secrets" / "sandbox-webhook-secret").read_text().strip().encode()

    async def key(self, *, tenant: str | None = None, principal: str = "alice", scopes=SCOPES) -> str:
        owner = service_urls(self.admin_url, "clearhouse_gateway")[0]
        return await create_key(owner, tenant=tenant or new_tenant(), principal=principal, scopes=list(scopes))

    async def revoke(self, key: str) -> None:
        await revoke_key(service_urls(self.admin_url, "clearhouse_gateway")[0], key)

    def api(self, key: str | None) -> Api:
        return Api(self.gateway, key)


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def sign_webhook(secret: bytes, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The sandbox processor's signature: HMAC-SHA256 over `<timestamp>.<body>`."""
    stamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Clearhouse-Signature": f"t={stamp},v1={digest}", "Content-Type": "application/json"}


class Api:
    """A partner's view of the gateway: JSON in, JSON out, an Idempotency-Key on every POST."""

    def __init__(self, base: str, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(base_url=base, headers=headers, timeout=60)

    async def request(self, method: str, path: str, **kw) -> httpx.Response:
        if method in ("POST", "PUT", "PATCH"):
            kw.setdefault("headers", {}).setdefault("Idempotency-Key", uuid.uuid4().hex)
        return await self.http.request(method, path, **kw)

    async def post(self, path: str, body=None, **kw) -> httpx.Response:
        return await self.request("POST", path, json=body, **kw)

    async def get(self, path: str, **params) -> httpx.Response:
        return await self.http.get(path, params=params)

    async def created(self, path: str, body: dict, status: int = 201) -> dict:
        response = await self.post(path, body)
        assert response.status_code == status, response.text
        return response.json()

    async def account(self, name: str = "customer", normal_balance: str = "credit", **extra) -> str:
        return (await self.created("/v1/ledger/accounts", {"name": name, "currency": "EUR",
                                                           "normal_balance": normal_balance, **extra}))["id"]

    async def funded_account(self, amount: int = 10_000_000) -> str:
        customer = await self.account()
        funding = await self.account("funding", "debit", allow_negative=True)
        await self.created("/v1/ledger/transactions", {"entries": [
            {"account_id": funding, "direction": "debit", "amount": amount},
            {"account_id": customer, "direction": "credit", "amount": amount}]})
        return customer

    async def pay(self, account: str, amount: int = 1_000, *, name: str = "Jane Doe",
                  iban_: str = "DE89370400440532013000", reference: str = "invoice 42") -> dict:
        return await self.created("/v1/payments", {"amount": amount, "currency": "EUR", "debit_account_id": account,
                                                   "payee": {"name": name, "iban": iban_}, "reference": reference})

    async def until_status(self, payment_id: str, *statuses: str, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            payment = (await self.get(f"/v1/payments/{payment_id}")).json()
            if payment.get("status") in statuses:
                return payment
            assert time.monotonic() < deadline, f"payment {payment_id} stayed {payment}, expected {statuses}"
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self.http.aclose()


def assert_problem(response: httpx.Response, status: int | tuple[int, ...], code: str | None = None) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, f"{response.status_code} {response.text[:500]}"
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == response.status_code and body["code"] and body["title"], body
    if code is not None:
        assert body["code"] == code, body
    return body


@pytest.fixture(scope="package")
def hostile(tmp_path_factory) -> Hostile:
    home = tmp_path_factory.mktemp("hostile") / "home"
    up = Up(home, **PLATFORM_ENV)
    lines = up.wait_for(r"Ctrl-C stops everything", timeout=240)
    gateway = next(m.group(1) for line in lines if (m := re.search(r"gateway URL\s+(http://\S+)", line)))
    key = next(m.group(1) for line in lines if (m := re.search(r"demo API key\s+(\S+)", line)))
    ports = json.loads((home / "state.json").read_text())["ports"]
    try:
        yield Hostile(home=home, gateway=gateway, demo_key=key, ports=ports)
    finally:
        assert up.stop() == 0


@pytest.fixture(scope="package")
async def world(hostile):
    """Tenant A's objects of every kind (tests.hostile.world), made once for the package."""
    from tests.hostile.world import build_world

    tenant = new_tenant()
    key = await hostile.key(tenant=tenant, principal="alice")
    api = hostile.api(key)
    try:
        return await build_world(api, key, tenant)
    finally:
        await api.close()
