"""The console's calls to the services, made as the signed-in principal through the same
door as the public API:

    route of the public path (gateway.routes) ─▶ the key's rate bucket ─▶ its scope
      ─▶ a fresh internal token (tenant, principal, scopes) ─▶ the service

So the services apply their own scope checks, segregation of duties, tenant scoping and
idempotency to a person in the console exactly as to an API client, and their events
record the principal as the actor. This module never calls a service without the
signed-in key's scopes, never invents a tenant, and never reuses an Idempotency-Key
across two form submissions (each rendered form carries its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from fastapi import Response

from gateway import composition
from gateway.keystore import VerifiedKey
from gateway.proxy import Caller, Gateway
from gateway.routes import resolve
from shared.errors import NotFound


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def problem(self) -> dict:
        """The service's problem body (or a stand-in) for a failed answer."""
        if isinstance(self.body, dict) and "code" in self.body:
            return self.body
        return {"status": self.status, "code": f"http_{self.status}", "title": "Request failed",
                "detail": f"The service answered {self.status}."}


def path(template: str, *parts: str) -> str:
    """A public path with each id quoted as one segment."""
    return template.format(*(quote(str(p), safe="") for p in parts))


class ConsoleApi:
    def __init__(self, gateway: Gateway, key: VerifiedKey) -> None:
        self.gateway = gateway
        self.key = key

    def may(self, scope: str) -> bool:
        return scope in self.key.scopes

    def _caller(self, scope: str | None) -> Caller:
        return self.gateway.admit(self.key, (scope,) if scope else ())

    async def get(self, public_path: str, **params: Any) -> Answer:
        query = urlencode({k: v for k, v in params.items() if v is not None})
        return await self._call("GET", public_path + (f"?{query}" if query else ""))

    async def post(self, public_path: str, body: dict, *, idempotency_key: str) -> Answer:
        return await self._call("POST", public_path, body=body, idempotency_key=idempotency_key)

    async def _call(self, method: str, target: str, *, body: dict | None = None,
                    idempotency_key: str | None = None) -> Answer:
        route = resolve(method, target.split("?", 1)[0])
        if route is None or route.scope is None:
            raise NotFound("No such page.")
        caller = self._caller(route.scope)
        headers = self.gateway.internal_headers(caller)
        headers.append(("accept", "application/json"))
        content = None
        if body is not None:
            content = orjson.dumps(body)
            headers += [("content-type", "application/json"), ("content-length", str(len(content)))]
        if idempotency_key:
            headers.append(("idempotency-key", idempotency_key))
        request = self.gateway.upstreams.build(route.service, method, target.encode(), headers=headers,
                                               content=content)
        response = await self.gateway.upstreams.send(route.service, request)
        return Answer(response.status_code, _json(response.content), dict(response.headers))

    async def timeline(self, payment_id: str) -> Answer:
        """The composed cross-service timeline, exactly as GET /v1/payments/{id}/timeline."""
        caller = self._caller("payments:read")
        response: Response = await composition.payment_timeline(self.gateway, caller, payment_id)
        return Answer(response.status_code, _json(bytes(response.body)), dict(response.headers))


def _json(content: bytes) -> Any:
    try:
        return orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        return None
