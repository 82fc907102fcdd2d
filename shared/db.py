"""Async SQLAlchemy engine and sessions for one service's own database.

One engine per process, created from the service's settings; nothing here knows any
other service's database.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def async_url(url: str) -> str:
    """Accept plain `postgresql://` URLs (what people paste) and pick the asyncpg driver."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix):]
    raise ValueError(f"not a PostgreSQL URL: {url.split('@')[-1]}")


def plain_url(url: str) -> str:
    """The libpq form asyncpg.connect() understands."""
    return async_url(url).replace("postgresql+asyncpg://", "postgresql://", 1)


# A transaction left open by its process (a task cancelled mid-flight, a connection lost
# to the pool) keeps its row and advisory locks, among them an Idempotency-Key's, until
# the server ends it. No use case waits between statements for anything near this long.
IDLE_IN_TRANSACTION_TIMEOUT_S = 60.0


def make_engine(url: str, *, pool_size: int = 20, application_name: str = "clearhouse",
                idle_in_transaction_timeout_s: float = IDLE_IN_TRANSACTION_TIMEOUT_S) -> AsyncEngine:
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"server_settings": {
            "application_name": application_name,
            "idle_in_transaction_session_timeout": str(int(idle_in_transaction_timeout_s * 1000)),
        }},
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
