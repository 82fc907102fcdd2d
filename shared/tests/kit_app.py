"""Helpers for the kit's HTTP tests: an internal-token key pair, bearer headers, a client
for an app, and a migrated database with an engine over the service's runtime role."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from shared import testing
from shared.auth import generate_keypair
from shared.db import make_engine, make_sessionmaker

KIT_MIGRATIONS = Path(__file__).parent / "kit_migrations"
PRIVATE_PEM, PUBLIC_PEM = generate_keypair()


def bearer(
    *, tenant: str = "t1", principal: str = "alice", scopes: Iterable[str] = ("counters:write",)
) -> dict[str, str]:
    return testing.bearer(PRIVATE_PEM, tenant_id=tenant, principal=principal, scopes=tuple(scopes))


def client(app, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@asynccontextmanager
async def kit_database(platform, prefix: str):
    """A freshly migrated kit database; yields (ServiceDatabase, engine, sessionmaker)."""
    db = await platform.database(KIT_MIGRATIONS, prefix=prefix)
    engine = make_engine(db.app_url, pool_size=10)
    try:
        yield db, engine, make_sessionmaker(engine)
    finally:
        await engine.dispose()
