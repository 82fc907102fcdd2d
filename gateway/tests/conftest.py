"""The real thing for the gateway's tests: the four services' own apps, each on its own
port and migrated database, served by uvicorn over TCP, and the gateway (its own
database, real keys) in front of them. Nothing is mocked; faults are real ones: a stopped
service, a table locked in a service's database, a port that accepts and never answers.
"""

from __future__ import annotations

import asyncio
import importlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn

from clearhouse.embedded import free_port
from clearhouse.provision import ServiceDatabase
from gateway.api import MIGRATIONS, create_app
from gateway.keys import create_key
from gateway.settings import UPSTREAMS, Settings

ROOT = Path(__file__).resolve().parents[2]


class Served:
    """An ASGI app served by uvicorn on 127.0.0.1:port, in this event loop."""

    def __init__(self, app, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    access_log=False, lifespan="on", timeout_graceful_shutdown=2))
        self.task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Served:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise RuntimeError(f"server on port {self.port} stopped before it started")
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task:
            await asyncio.wait_for(self.task, 10)


# The processor's webhook signing secret, so tests can sign webhooks as the processor does.
WEBHOOK_SECRET = "whsec-gateway-tests"
_SERVICE_SETTINGS = {"payments": {"sandbox_webhook_secret": WEBHOOK_SECRET}}


def service_app(service: str, database_url: str, public_pem: str, bootstrap: str):
    settings_cls = importlib.import_module(f"services.{service}.settings").Settings
    create = importlib.import_module(f"services.{service}.api").create_app
    return create(settings_cls(database_url=database_url, INTERNAL_TOKEN_PUBLIC_KEY=public_pem,
                               KAFKA_BOOTSTRAP_SERVERS=bootstrap, **_SERVICE_SETTINGS.get(service, {})))


def service_migrations(service: str) -> Path:
    return ROOT / "services" / service / "migrations"


@dataclass
class Stack:
    platform: object
    private_pem: str
    public_pem: str
    databases: dict[str, ServiceDatabase]
    services: dict[str, Served]
    gateway_db: ServiceDatabase
    gateway: Served | None = None
    extra: list[Served] = field(default_factory=list)

    def settings(self, **overrides) -> Settings:
        values = {f"{s}_url": self.services[s].url for s in UPSTREAMS}
        values.update(database_url=self.gateway_db.app_url, INTERNAL_TOKEN_PRIVATE_KEY=self.private_pem,
                      rate_limit_per_s=1000.0, rate_limit_burst=1000, composition_timeout_s=2.0)
        values.update(overrides)
        return Settings(**values)

    async def key(self, *, tenant: str, principal: str = "alice", scopes=("payments:read",), **kw) -> str:
        return await create_key(self.gateway_db.owner_url, tenant=tenant, principal=principal, scopes=scopes, **kw)

    @asynccontextmanager
    async def another_gateway(self, **overrides) -> AsyncIterator[Served]:
        """A second gateway on the same key database, e.g. with a tiny rate limit."""
        served = await Served(create_app(self.settings(**overrides))).start()
        try:
            yield served
        finally:
            await served.stop()

    @asynccontextmanager
    async def another_service(self, service: str) -> AsyncIterator[Served]:
        """A second process of a service on its own database (one we may stop)."""
        served = await Served(service_app(service, self.databases[service].app_url, self.public_pem,
                                          self.platform.bootstrap)).start()
        try:
            yield served
        finally:
            await served.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def assert_problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["request-id"]
    body = response.json()
    assert body["status"] == status and body["code"] == code and body["trace_id"], body
    return body


@pytest.fixture(scope="session")
async def stack(platform, internal_keys) -> AsyncIterator[Stack]:
    private_pem, public_pem = internal_keys
    databases = {s: await platform.database(service_migrations(s), prefix=s[:5]) for s in UPSTREAMS}
    services = {}
    for s in UPSTREAMS:
        services[s] = await Served(service_app(s, databases[s].app_url, public_pem, platform.bootstrap)).start()
    gateway_db = await platform.database(MIGRATIONS, prefix="gw")
    built = Stack(platform, private_pem, public_pem, databases, services, gateway_db)
    built.gateway = await Served(create_app(built.settings())).start()
    try:
        yield built
    finally:
        await built.gateway.stop()
        for served in services.values():
            await served.stop()


@pytest.fixture
async def client(stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=10) as http:
        yield http
