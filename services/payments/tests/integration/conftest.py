"""Fixtures: one freshly migrated payments database per test module, the service's app
on it, and a sessionmaker over the runtime role (the one the service itself uses)."""

from __future__ import annotations

import pytest

from services.payments.api import MIGRATIONS, create_app
from services.payments.tests.integration.harness import make_settings
from shared.db import make_engine, make_sessionmaker


@pytest.fixture(scope="module")
async def db(platform):
    return await platform.database(MIGRATIONS, prefix="pay")


@pytest.fixture(scope="module")
def settings(db, platform, internal_keys):
    return make_settings(db, internal_keys[1], platform.bootstrap)


@pytest.fixture(scope="module")
def app(settings):
    return create_app(settings)


@pytest.fixture(scope="module")
async def sessionmaker(db):
    engine = make_engine(db.app_url, pool_size=5)
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture(scope="module")
def private_pem(internal_keys):
    return internal_keys[0]
