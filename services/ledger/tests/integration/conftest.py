"""Fixtures for the ledger's integration tests: one freshly migrated ledger database per
test module (production's owner/app role split), the ledger app over the app role, and a
client that speaks for one tenant. Each test takes its own tenant, so tests sharing a
module's database never see each other's accounts."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from services.ledger.api import MIGRATIONS, create_app
from services.ledger.settings import Settings
from services.ledger.tests.integration.client import LedgerApi
from shared.db import make_engine, make_sessionmaker


@pytest.fixture(scope="module")
async def ledger_db(platform):
    return await platform.database(MIGRATIONS, prefix="ledger")


@pytest.fixture(scope="module")
def ledger_settings(ledger_db, internal_keys, platform) -> Settings:
    return Settings(database_url=ledger_db.app_url, INTERNAL_TOKEN_PUBLIC_KEY=internal_keys[1],
                    KAFKA_BOOTSTRAP_SERVERS=platform.bootstrap, db_pool_size=20)


@pytest.fixture(scope="module")
async def ledger_app(ledger_settings):
    app = create_app(ledger_settings)
    yield app
    await app.state.engine.dispose()


@pytest.fixture(scope="module")
async def sessionmaker(ledger_db):
    """The service role's sessions, for the tests' own reads."""
    engine = make_engine(ledger_db.app_url, pool_size=5)
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture
def tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def api(ledger_app, internal_keys, tenant):
    async with LedgerApi.connect(ledger_app, private_pem=internal_keys[0], tenant=tenant) as client:
        yield client


async def scalar(sessionmaker, sql: str, **params):
    async with sessionmaker() as session:
        return (await session.execute(text(sql), params)).scalar()
