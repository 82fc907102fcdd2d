"""Readiness: the checks behind `/readyz` on every Clearhouse process, and the small
health server the relay and consumer processes answer probes with.

    check        passes when
    database     the process's database answers a query
    migrations   that database's schema is at the head of the code's migrations
    broker       a Kafka broker of KAFKA_BOOTSTRAP_SERVERS answers a metadata request

An API answers `/readyz` by running its checks there and then (the broker's answer is
cached for a moment, so a storm of probes is not a storm of broker connections). A relay
or consumer process runs its checks on its own event loop every few seconds, and its
health server (a thread) answers from the last results; `/healthz` there fails when that
loop stopped turning, which is what a liveness probe should restart.

A failed check is named in a problem+json body; reasons never carry a URL, a password or
an exception's text (those go to the log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from aiokafka.client import AIOKafkaClient
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.errors import PROBLEM_MEDIA_TYPE, PROBLEM_TYPE_BASE
from shared.migrate import alembic_config

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
BROKER_CACHE_S = 2.0
WORKER_CHECK_INTERVAL_S = 5.0
# A worker's results older than this (its loop is stuck or too busy to check) count as failed.
WORKER_STALE_AFTER_S = 30.0

Check = Callable[[], Awaitable[str | None]]  # None when it passes, else a reason safe to show


def migration_heads(migrations_dir: Path) -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config(migrations_dir, "")).get_heads())


def database_check(engine: AsyncEngine) -> Check:
    async def check() -> str | None:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S), engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # any failure means "not ready"; the reason is for the log only
            log.warning("readiness: database check failed: %s", type(exc).__name__, exc_info=exc)
            return "The database is not reachable."
        return None

    return check


def migrations_check(engine: AsyncEngine, migrations_dir: Path) -> Check:
    expected = migration_heads(migrations_dir)

    async def check() -> str | None:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S), engine.connect() as conn:
                applied = set((await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars())
        except Exception as exc:
            log.warning("readiness: migrations check failed: %s", type(exc).__name__, exc_info=exc)
            return "The schema version could not be read."
        if applied != expected:
            return f"The database schema is at {sorted(applied) or 'no revision'}, this code expects {sorted(expected)}."
        return None

    return check


def broker_check(bootstrap: str, *, cache_s: float = BROKER_CACHE_S) -> Check:
    """A metadata round trip to the cluster, remembered for `cache_s` seconds."""
    lock = asyncio.Lock()
    last: tuple[float, str | None] = (float("-inf"), None)

    async def ask() -> str | None:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(PROBE_TIMEOUT_S * 1000),
                                client_id="clearhouse-readiness")
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await client.bootstrap()
        except Exception as exc:
            log.warning("readiness: broker check failed: %s", type(exc).__name__, exc_info=exc)
            return "The Kafka broker is not reachable."
        finally:
            await client.close()
        return None

    async def check() -> str | None:
        nonlocal last
        async with lock:
            checked_at, result = last
            if time.monotonic() - checked_at >= cache_s:
                result = await ask()
                last = (time.monotonic(), result)
            return result

    return check


def standard_checks(*, engine: AsyncEngine, migrations_dir: Path | None, bootstrap: str | None) -> dict[str, Check]:
    checks = {"database": database_check(engine)}
    if migrations_dir is not None:
        checks["migrations"] = migrations_check(engine, migrations_dir)
    if bootstrap:
        checks["broker"] = broker_check(bootstrap)
    return checks


async def run_checks(checks: Mapping[str, Check]) -> dict[str, str | None]:
    """Every check at once; a check that raises counts as failed, never as passed."""
    names = list(checks)
    results = await asyncio.gather(*(checks[n]() for n in names), return_exceptions=True)
    return {name: ("The check could not run." if isinstance(r, BaseException) else r)
            for name, r in zip(names, results)}


def failure_detail(results: Mapping[str, str | None]) -> str | None:
    failed = [f"{name}: {reason}" for name, reason in results.items() if reason]
    return "Not ready. " + " ".join(failed) if failed else None


def check_summary(results: Mapping[str, str | None]) -> dict[str, str]:
    """The problem body's `checks` member: "ok" or the reason, per check."""
    return {name: reason or "ok" for name, reason in results.items()}


class WorkerHealth:
    """Health of a process without an HTTP API (relay, consumer), answered from a thread.

    `monitor()` runs on the process's event loop: it refreshes the check results and a
    heartbeat every `interval_s`. `answer(path)` is called by the health server's thread
    and only reads what the loop last wrote (a tuple swap; no lock needed)."""

    def __init__(self, checks: Mapping[str, Check], *, interval_s: float = WORKER_CHECK_INTERVAL_S,
                 stale_after_s: float = WORKER_STALE_AFTER_S) -> None:
        self._checks = dict(checks)
        self._interval_s = interval_s
        self._stale_after_s = stale_after_s
        self._heartbeat = time.monotonic()
        self._results: tuple[float, dict[str, str | None]] | None = None

    async def monitor(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._heartbeat = time.monotonic()
            self._results = (time.monotonic(), await run_checks(self._checks))
            try:
                await asyncio.wait_for(stop.wait(), timeout=self._interval_s)
            except asyncio.TimeoutError:
                pass

    def answer(self, path: str) -> tuple[int, str, bytes] | None:
        """(status, content type, body) for /healthz and /readyz; None for other paths."""
        now = time.monotonic()
        if path == "/healthz":
            if now - self._heartbeat > self._stale_after_s:
                return _problem(f"The event loop has not turned for {now - self._heartbeat:.0f}s.", {})
            return 200, "application/json", b'{"status": "ok"}'
        if path == "/readyz":
            if self._results is None:
                return _problem("The first checks have not finished yet.", {})
            checked_at, results = self._results
            if now - checked_at > self._stale_after_s:
                return _problem(f"The last checks are {now - checked_at:.0f}s old.", check_summary(results))
            detail = failure_detail(results)
            if detail:
                return _problem(detail, check_summary(results))
            return 200, "application/json", json.dumps({"status": "ready", "checks": check_summary(results)}).encode()
        return None


def _problem(detail: str, checks: dict[str, str]) -> tuple[int, str, bytes]:
    body = {"type": f"{PROBLEM_TYPE_BASE}not_ready", "title": "Not ready", "status": 503, "detail": detail,
            "code": "not_ready", "checks": checks}
    return 503, PROBLEM_MEDIA_TYPE, json.dumps(body).encode()
