"""Creates what a service needs on a PostgreSQL server it is given: its own database, an
owner role that runs migrations, and a runtime role that can connect to that database
only. Idempotent: a second run changes nothing.

Works the same on the embedded server and on an external one given by URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from shared.db import plain_url


@dataclass(frozen=True)
class ServiceDatabase:
    name: str
    owner_url: str  # migrations
    app_url: str  # the running service
    app_role: str


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _with(url: str, *, user: str, password: str | None, database: str) -> str:
    parts = urlsplit(plain_url(url))
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    netloc = quote(user) + (f":{quote(password)}" if password else "") + f"@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, "/" + database, parts.query, ""))


def service_urls(admin_url: str, database: str, *, password: str | None = None) -> tuple[str, str]:
    """(owner URL, app URL) of a provisioned service database on the admin URL's server."""
    return (_with(admin_url, user=f"{database}_owner", password=password, database=database),
            _with(admin_url, user=f"{database}_app", password=password, database=database))


async def provision_database(admin_url: str, database: str, *, password: str | None = None) -> ServiceDatabase:
    owner, app = f"{database}_owner", f"{database}_app"
    conn = await asyncpg.connect(plain_url(admin_url))
    try:
        for role in (owner, app):
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            verb = "ALTER" if exists else "CREATE"
            secret = f" PASSWORD '{password}'" if password else ""
            await conn.execute(f"{verb} ROLE {_ident(role)} LOGIN{secret}")
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(f"CREATE DATABASE {_ident(database)} OWNER {_ident(owner)}")
        # Nobody but the two roles of this service may connect: no cross-database reads.
        await conn.execute(f"REVOKE ALL ON DATABASE {_ident(database)} FROM PUBLIC")
        await conn.execute(f"GRANT CONNECT, TEMPORARY ON DATABASE {_ident(database)} TO {_ident(app)}")
    finally:
        await conn.close()
    db_conn = await asyncpg.connect(_with(admin_url, user=owner, password=password, database=database))
    try:
        await db_conn.execute(f"GRANT USAGE ON SCHEMA public TO {_ident(app)}")
        await db_conn.execute(
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {_ident(app)}"
        )
    finally:
        await db_conn.close()
    owner_url, app_url = service_urls(admin_url, database, password=password)
    return ServiceDatabase(name=database, owner_url=owner_url, app_url=app_url, app_role=app)


async def drop_database(admin_url: str, database: str) -> None:
    conn = await asyncpg.connect(plain_url(admin_url))
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_ident(database)} WITH (FORCE)")
    finally:
        await conn.close()
