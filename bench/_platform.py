"""The embedded pair for benchmarks: a throwaway PostgreSQL and Tansu broker, the same
real parts the tests use, torn down at the end."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from clearhouse.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from clearhouse.provision import provision_database
from shared import migrate

KIT_MIGRATIONS = Path(__file__).resolve().parent.parent / "shared" / "tests" / "kit_migrations"


@contextlib.contextmanager
def embedded_pair():
    workdir = Path(tempfile.mkdtemp(prefix="clearhouse-bench-"))
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    broker = EmbeddedBroker(free_port(), workdir / "tansu.log")
    try:
        pg.start()
        broker.start()
        yield pg, broker
    finally:
        broker.stop()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def kit_database(admin_url: str, name: str):
    import asyncio

    db = await provision_database(admin_url, name)
    await asyncio.to_thread(migrate.upgrade, KIT_MIGRATIONS, db.owner_url, db.app_role)
    return db


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]
