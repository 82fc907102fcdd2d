"""Alembic, one history per service, run programmatically or from `alembic -c`.

Each service's `migrations/env.py` calls `run_env()`; its first revision calls
`create_kit_tables()`. Migrations run as the owner role; the runtime role named by
`app_role` only receives the grants each revision gives it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context, op
from alembic.config import Config
from sqlalchemy import pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from shared.db import async_url
from shared.schema import KIT_DDL, kit_grants


def alembic_config(migrations_dir: Path, url: str, app_role: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(migrations_dir / "versions"))
    cfg.attributes["url"] = url
    cfg.attributes["app_role"] = app_role
    return cfg


def upgrade(migrations_dir: Path, url: str, app_role: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(migrations_dir, url, app_role), revision)


def app_role() -> str | None:
    """The runtime role to grant to, or None when the service runs as the owner."""
    role = context.config.attributes.get("app_role") or context.get_x_argument(as_dictionary=True).get("app_role")
    current = op.get_bind().execute(text("SELECT current_user")).scalar()
    return None if not role or role == current else role


def grant(privileges: str, table: str) -> None:
    role = app_role()
    if role:
        op.execute(f'GRANT {privileges} ON {table} TO "{role}"')


def create_kit_tables() -> None:
    for statement in KIT_DDL:
        op.execute(statement)
    role = app_role()
    if role:
        for statement in kit_grants(role):
            op.execute(statement)
        # /readyz, running as the service role, compares the applied revision with the code's head.
        op.execute(f'GRANT SELECT ON alembic_version TO "{role}"')


def run_env() -> None:
    """Body of every service's env.py (online mode only: migrations need a live database)."""
    url = context.config.attributes.get("url") or context.config.get_main_option("sqlalchemy.url")

    def do_run(connection) -> None:
        context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()

    async def run_async() -> None:
        engine = create_async_engine(async_url(url), poolclass=pool.NullPool)
        async with engine.connect() as connection:
            await connection.run_sync(do_run)
            await connection.commit()
        await engine.dispose()

    asyncio.run(run_async())
