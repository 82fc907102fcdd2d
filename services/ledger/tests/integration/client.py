"""A small client of the ledger API for tests: one tenant, bearer tokens the gateway
would send, and shortcuts for the calls most tests make. It asserts nothing about
answers the test has not asked about."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from shared.testing import bearer

READ_WRITE = ("ledger:read", "ledger:write")


class LedgerApi:
    def __init__(self, http: httpx.AsyncClient, *, private_pem: str, tenant: str) -> None:
        self.http = http
        self.private_pem = private_pem
        self.tenant = tenant

    @classmethod
    @asynccontextmanager
    async def connect(cls, app, *, private_pem: str, tenant: str) -> AsyncIterator[LedgerApi]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://ledger", timeout=60) as http:
            yield cls(http, private_pem=private_pem, tenant=tenant)

    def for_tenant(self, tenant: str) -> LedgerApi:
        return LedgerApi(self.http, private_pem=self.private_pem, tenant=tenant)

    def headers(self, *, key: str | None = None, scopes=READ_WRITE, principal: str = "alice") -> dict[str, str]:
        headers = bearer(self.private_pem, tenant_id=self.tenant, principal=principal, scopes=scopes)
        if key is not None:
            headers["Idempotency-Key"] = key
        return headers

    async def post(self, path: str, body: Any = None, *, key: str | None = None, scopes=READ_WRITE,
                   content: bytes | None = None) -> httpx.Response:
        headers = self.headers(key=key, scopes=scopes)
        if content is not None:
            return await self.http.post(path, content=content, headers={**headers, "content-type": "application/json"})
        return await self.http.post(path, json=body, headers=headers)

    async def get(self, path: str, params: dict | None = None, *, scopes=READ_WRITE) -> httpx.Response:
        return await self.http.get(path, params=params, headers=self.headers(scopes=scopes))

    # ── shortcuts ────────────────────────────────────────────────────────────────
    async def account(self, *, currency: str = "EUR", normal_balance: str = "credit", allow_negative: bool = False,
                      name: str | None = None) -> dict:
        response = await self.post("/v1/ledger/accounts", {
            "name": name or f"acct-{uuid.uuid4().hex[:6]}", "currency": currency,
            "normal_balance": normal_balance, "allow_negative": allow_negative})
        assert response.status_code == 201, response.text
        return response.json()

    async def system_account(self, code: str, currency: str = "EUR") -> dict:
        response = await self.get("/v1/ledger/accounts", {"kind": "system", "currency": currency, "limit": 10})
        assert response.status_code == 200, response.text
        return next(a for a in response.json()["data"] if a["system_code"] == code)

    async def transfer(self, debit: str, credit: str, amount: int, **more) -> httpx.Response:
        return await self.post("/v1/ledger/transactions", {
            "entries": [{"account_id": debit, "direction": "debit", "amount": amount},
                        {"account_id": credit, "direction": "credit", "amount": amount}], **more})

    async def fund(self, account: dict, amount: int) -> dict:
        """Money in from the tenant's funding account."""
        funding = await self.system_account("funding", account["currency"])
        response = await self.transfer(funding["id"], account["id"], amount)
        assert response.status_code == 201, response.text
        return response.json()

    async def balance(self, account_id: str, as_of: str | None = None) -> dict:
        response = await self.get(f"/v1/ledger/accounts/{account_id}/balance",
                                  {"as_of": as_of} if as_of else None)
        assert response.status_code == 200, response.text
        return response.json()

    async def hold(self, debit: str, credit: str, amount: int, **more) -> httpx.Response:
        return await self.post("/v1/ledger/holds", {"debit_account_id": debit, "credit_account_id": credit,
                                                    "amount": amount, **more})
