"""Verifying a presented API key on every request, fast, without delaying a revocation.

    request ─▶ parse ─▶ cache hit? ──no──▶ SELECT key ⋈ principal (effective scopes) ─▶ cache
                          │yes                                  ▲
                          ▼                                     │ evict at once
                 constant-time secret compare      LISTEN gateway_keys (trigger on revoke,
                          ▼                        scope change): one connection per process
                     VerifiedKey

Bound on a revocation: it takes effect when the commit's notification reaches this
process (milliseconds). While the listening connection is down the cache is bypassed
(every request reads the database) and it is emptied when listening resumes, since
notifications may have been missed. A cache fill that raced a notification is discarded
(generation check), so a read from before the revoke cannot be cached after it. Entries
also expire after `ttl_s` (5 s by default): the backstop for a connection that died
silently before its keepalive noticed.

This module must never accept a key whose secret it did not compare, nor keep serving a
key from cache once it heard that the key changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import ApiKeyRevoked, AuthUnavailable, InvalidApiKey
from gateway.keys import parse_key, secret_matches
from shared.db import plain_url

log = logging.getLogger(__name__)

CHANNEL = "gateway_keys"
_KEEPALIVE_S = 5.0

_LOAD = text(
    """
    SELECT k.secret_hash, k.tenant_id, k.principal_id, k.revoked_at IS NOT NULL AS revoked,
           ARRAY(SELECT unnest(k.scopes) INTERSECT SELECT unnest(p.scopes)) AS scopes
    FROM api_keys k JOIN principals p ON p.tenant_id = k.tenant_id AND p.id = k.principal_id
    WHERE k.id = :key_id AND k.environment = :environment
    """
)
_TOUCH = text("UPDATE api_keys SET last_used_at = clock_timestamp() WHERE id = :key_id")


@dataclass(frozen=True)
class VerifiedKey:
    key_id: str
    tenant_id: str
    principal: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class _Entry:
    secret_hash: bytes | None  # None: no such key (cached too, so garbage keys cost no query)
    key: VerifiedKey | None
    revoked: bool
    expires_at: float


class KeyStore:
    def __init__(
        self, engine: AsyncEngine, *, database_url: str, environment: str = "live", ttl_s: float = 5.0,
        max_entries: int = 10_000, last_used_resolution_s: float = 60.0,
    ) -> None:
        self.engine = engine
        self.database_url = database_url
        self.environment = environment
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.last_used_resolution_s = last_used_resolution_s
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._generation = 0
        self._listening = False
        self._listener: asyncio.Task | None = None
        self._last_touched: dict[str, float] = {}
        self._background: set[asyncio.Task] = set()

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._listener = asyncio.create_task(self._listen_forever(), name="gateway-key-listener")

    async def stop(self) -> None:
        if self._listener:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)

    @property
    def listening(self) -> bool:
        return self._listening

    # --- verification ----------------------------------------------------------------

    async def verify(self, presented: str) -> VerifiedKey:
        parsed = parse_key(presented)
        if parsed is None:
            raise InvalidApiKey()
        if parsed.environment != self.environment:
            raise InvalidApiKey(f"This is a {parsed.environment} key; this gateway accepts {self.environment} keys.")
        entry = self._cached(parsed.key_id)
        if entry is None:
            entry = await self._load(parsed.key_id)
        if entry.secret_hash is None or not secret_matches(parsed.secret, entry.secret_hash):
            raise InvalidApiKey()
        if entry.revoked or entry.key is None:
            raise ApiKeyRevoked()
        self._touch(parsed.key_id)
        return entry.key

    def _cached(self, key_id: str) -> _Entry | None:
        if not self._listening:
            return None  # deaf to revocations: every request asks the database
        entry = self._cache.get(key_id)
        if entry is None or entry.expires_at <= time.monotonic():
            return None
        return entry

    async def _load(self, key_id: str) -> _Entry:
        generation = self._generation
        try:
            async with self.engine.connect() as conn:
                row = (await conn.execute(_LOAD, {"key_id": key_id, "environment": self.environment})).first()
        except Exception as exc:  # the database is the only source of truth: no answer, no entry
            log.error("cannot load api key %s: %s", key_id, type(exc).__name__, exc_info=exc)
            raise AuthUnavailable("API keys cannot be verified right now; retry shortly.") from None
        expires_at = time.monotonic() + self.ttl_s
        if row is None:
            entry = _Entry(None, None, False, expires_at)
        else:
            key = VerifiedKey(key_id=key_id, tenant_id=row.tenant_id, principal=row.principal_id,
                              scopes=frozenset(row.scopes))
            entry = _Entry(bytes(row.secret_hash), key, row.revoked, expires_at)
        # A notification while we read means our row may predate a revoke: use it for this
        # request (it raced the revoke), but never cache it.
        if self._listening and generation == self._generation:
            self._cache[key_id] = entry
            self._cache.move_to_end(key_id)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return entry

    def _touch(self, key_id: str) -> None:
        """Stamp last_used_at at most once per resolution per key, off the request path."""
        now = time.monotonic()
        last = self._last_touched.get(key_id)
        if last is not None and now - last < self.last_used_resolution_s:
            return
        if len(self._last_touched) >= self.max_entries:
            self._last_touched.clear()  # at worst one extra stamp per key
        self._last_touched[key_id] = now
        task = asyncio.create_task(self._stamp(key_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stamp(self, key_id: str) -> None:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(_TOUCH, {"key_id": key_id})
        except Exception as exc:  # a missed stamp is harmless; the request already succeeded
            log.warning("could not stamp last_used_at of api key %s: %s", key_id, type(exc).__name__)

    # --- invalidation ----------------------------------------------------------------

    def invalidate(self, key_id: str | None = None) -> None:
        self._generation += 1
        if key_id is None or key_id == "*":
            self._cache.clear()
        else:
            self._cache.pop(key_id, None)

    def _on_notification(self, _conn, _pid, _channel, payload: str) -> None:
        self.invalidate(payload or None)

    async def _listen_forever(self) -> None:
        backoff = 0.1
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(plain_url(self.database_url), timeout=5,
                                             server_settings={"application_name": "gateway-key-listener"})
                await conn.add_listener(CHANNEL, self._on_notification)
                self.invalidate()  # whatever was cached may have missed notifications
                self._listening = True
                backoff = 0.1
                log.info("listening for api key changes")
                while True:
                    await asyncio.sleep(_KEEPALIVE_S)
                    await conn.fetchval("SELECT 1", timeout=_KEEPALIVE_S)
            except asyncio.CancelledError:
                if conn is not None:
                    conn.terminate()
                raise
            except Exception as exc:
                was_listening, self._listening = self._listening, False
                self.invalidate()
                if was_listening:
                    log.warning("api key listener lost (%s); verifying every request against the database",
                                type(exc).__name__)
                else:
                    log.warning("api key listener cannot connect (%s); retrying in %.1fs", type(exc).__name__,
                                backoff)
                if conn is not None:
                    conn.terminate()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self._listening = False
