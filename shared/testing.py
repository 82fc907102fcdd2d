"""pytest plugin: the real parts every integration test talks to.

One PostgreSQL server and one broker per test session: the embedded pair by default, or
external ones when `CLEARHOUSE_TEST_DATABASE_URL` (a superuser URL) and
`KAFKA_BOOTSTRAP_SERVERS` are set. Each test module that needs a database gets a fresh
one, built by running that service's Alembic migrations, with the owner/app role split
of production. No mocks of either part.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import text

from clearhouse.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from clearhouse.provision import ServiceDatabase, provision_database
from shared import migrate


@dataclass
class TestPlatform:
    admin_url: str
    bootstrap: str
    broker: EmbeddedBroker | None

    async def database(self, migrations_dir: Path, prefix: str = "t") -> ServiceDatabase:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        db = await provision_database(self.admin_url, name)
        await asyncio.to_thread(migrate.upgrade, migrations_dir, db.owner_url, db.app_role)
        return db

    def superuser_url(self, database: ServiceDatabase) -> str:
        """For tests that play the server's part (terminating sessions, reading catalogs)."""
        parts = urlsplit(self.admin_url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + database.name, parts.query, ""))

    def restart_broker(self) -> None:
        """Stop and start the embedded broker on the same port: it comes back empty."""
        assert self.broker is not None, "broker restarts need the embedded broker"
        self.broker.stop()
        self.broker.start()


@pytest.fixture(scope="session")
def platform():
    workdir = Path(tempfile.mkdtemp(prefix="clearhouse-test-"))
    pg = broker = None
    admin_url = os.environ.get("CLEARHOUSE_TEST_DATABASE_URL")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    try:
        if not admin_url:
            pg = EmbeddedPostgres(workdir / "pg", free_port())
            pg.start()
            admin_url = pg.url()
        if not bootstrap:
            broker = EmbeddedBroker(free_port(), workdir / "tansu.log")
            broker.start()
            bootstrap = broker.bootstrap
        yield TestPlatform(admin_url=admin_url, bootstrap=bootstrap, broker=broker)
    finally:
        if broker:
            broker.stop()
        if pg:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def internal_keys() -> tuple[str, str]:
    """A key pair playing the gateway's: (private_pem, public_pem)."""
    from shared.auth import generate_keypair

    return generate_keypair()


def bearer(private_pem: str, *, tenant_id: str, principal: str, scopes: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The Authorization header the gateway would send for this principal."""
    from shared.auth import sign_internal_token

    token = sign_internal_token(private_pem, tenant_id=tenant_id, principal=principal, scopes=list(scopes),
                                request_id=uuid.uuid4().hex)
    return {"Authorization": f"Bearer {token}"}


async def eventually(predicate, *, timeout: float = 30.0, interval: float = 0.05):
    """Await `predicate()` until it returns something truthy (and return that), or fail
    with its last answer: how tests wait for asynchronous effects, never with a sleep."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)


async def scalar(sessionmaker, sql: str, **params):
    async with sessionmaker() as session:
        return (await session.execute(text(sql), params)).scalar()


async def rows(sessionmaker, sql: str, **params) -> list:
    async with sessionmaker() as session:
        return list(await session.execute(text(sql), params))
