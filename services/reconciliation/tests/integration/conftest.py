"""Fixtures: one freshly migrated reconciliation database per test module, the service's
app on it, its read-model consumer running against the real broker, and a sessionmaker
over the runtime role (the one the service itself uses). Tests keep apart by tenant."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services.reconciliation.api import MIGRATIONS, create_app
from services.reconciliation.consumers import build_consumers
from services.reconciliation.tests.integration.harness import asgi_client, create_topics, make_settings
from shared.db import make_engine, make_sessionmaker


@pytest.fixture(scope="module")
async def db(platform):
    return await platform.database(MIGRATIONS, prefix="recon")


@pytest.fixture(scope="module")
def settings(db, platform, internal_keys):
    return make_settings(db, internal_keys[1], platform.bootstrap)


@pytest.fixture(scope="module")
def app(settings):
    return create_app(settings)


@pytest.fixture(scope="module")
async def client(app):
    async with asgi_client(app) as found:
        yield found


@pytest.fixture(scope="module")
async def sessionmaker(db):
    engine = make_engine(db.app_url, pool_size=5)
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture(scope="module")
def private_pem(internal_keys):
    return internal_keys[0]


@pytest.fixture(scope="module")
async def read_model(settings, sessionmaker):
    """The read-model consumer, running for the module, on the module's own topics."""
    await create_topics(settings)
    consumers = build_consumers(settings=settings, sessionmaker=sessionmaker)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in consumers]
    await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in consumers)), 60)
    yield consumers
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)


@pytest.fixture
def tenant() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"
