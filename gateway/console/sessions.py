"""Console sessions: an API key exchanged for a server-side session behind a cookie.

    POST /console/sign-in (api key) ─▶ KeyStore.verify ─▶ console_sessions row (sha256 of a
    fresh 256-bit token) ─▶ Set-Cookie ch_console=<token>; HttpOnly; SameSite=Strict; Path=/console
    each request ─▶ one query: session ⋈ key ⋈ principal (revoked? effective scopes now)

The browser holds only the opaque token (never the API key, nothing in localStorage); the
database holds only its hash. A session ends when the person signs out, when its key is
revoked (a trigger ends it in the revoking transaction; the join refuses it anyway), after
`console_session_ttl_s`, or after `console_idle_timeout_s` without a page being opened.
The CSRF token is derived from the session token (HMAC), so it changes with every
session and needs no storage; the sign-in form, which has no session yet, uses a
double-submit cookie.

This module must never store or log a session token or an API key, nor accept a session
whose key is revoked.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import AuthUnavailable
from gateway.keystore import VerifiedKey

log = logging.getLogger(__name__)

SESSION_COOKIE = "ch_console"
SIGN_IN_COOKIE = "ch_console_sign_in"  # double-submit CSRF token of the sign-in form
COOKIE_PATH = "/console"
_CSRF_CONTEXT = b"clearhouse console csrf v1"
_TOUCH_RESOLUTION = timedelta(seconds=30)  # last_seen_at is written at most this often per session
_PURGE_AFTER = timedelta(days=30)  # ended sessions stay this long (sign-in audit), then go

_OPEN = text("""
    INSERT INTO console_sessions (token_hash, key_id, tenant_id, principal_id, expires_at, user_agent)
    VALUES (:hash, :key_id, :tenant, :principal, clock_timestamp() + make_interval(secs => :ttl), :agent)
""")
_LOAD = text("""
    SELECT s.key_id, s.tenant_id, s.principal_id, s.created_at, s.last_seen_at, s.expires_at, s.ended_reason,
           k.revoked_at IS NOT NULL AS revoked,
           ARRAY(SELECT unnest(k.scopes) INTERSECT SELECT unnest(p.scopes)) AS scopes,
           clock_timestamp() AS now
    FROM console_sessions s
    JOIN api_keys k ON k.id = s.key_id
    JOIN principals p ON p.tenant_id = k.tenant_id AND p.id = k.principal_id
    WHERE s.token_hash = :hash
""")
_TOUCH = text("UPDATE console_sessions SET last_seen_at = clock_timestamp() WHERE token_hash = :hash "
              "AND ended_at IS NULL")
_END = text("UPDATE console_sessions SET ended_at = clock_timestamp(), ended_reason = :reason "
            "WHERE token_hash = :hash AND ended_at IS NULL")
_PURGE = text("DELETE FROM console_sessions WHERE expires_at < clock_timestamp() - make_interval(days => :days)")


class SessionEnded(Exception):
    """No usable session; `reason` says why, for the sign-in page."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ConsoleSession:
    key: VerifiedKey
    csrf_token: str
    created_at: datetime
    expires_at: datetime


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def csrf_token_for(session_token: str) -> str:
    return hmac.new(session_token.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def tokens_match(presented: str | None, expected: str) -> bool:
    return bool(presented) and hmac.compare_digest(presented.encode(), expected.encode())


class SessionStore:
    def __init__(self, engine: AsyncEngine, *, ttl_s: int, idle_timeout_s: int) -> None:
        self.engine = engine
        self.ttl_s = ttl_s
        self.idle = timedelta(seconds=idle_timeout_s)

    async def open(self, key: VerifiedKey, *, user_agent: str | None, replacing: str | None) -> str:
        """A new session for a verified key; returns the token for the cookie. A session
        the browser still carried is ended: a sign-in always gets a fresh token, so a
        token planted before sign-in (session fixation) is worth nothing after it."""
        token = secrets.token_urlsafe(32)
        try:
            async with self.engine.begin() as conn:
                if replacing:
                    await conn.execute(_END, {"hash": hash_token(replacing), "reason": "replaced"})
                await conn.execute(_OPEN, {"hash": hash_token(token), "key_id": key.key_id, "tenant": key.tenant_id,
                                           "principal": key.principal, "ttl": self.ttl_s,
                                           "agent": (user_agent or "")[:300] or None})
                # Housekeeping rides on sign-ins (rare, and the index makes it cheap).
                await conn.execute(_PURGE, {"days": _PURGE_AFTER.days})
        except Exception as exc:
            log.error("cannot open a console session: %s", type(exc).__name__, exc_info=exc)
            raise AuthUnavailable("Sessions cannot be opened right now; retry shortly.") from None
        log.info("console session opened", extra={"tenant_id": key.tenant_id, "principal": key.principal,
                                                  "api_key_id": key.key_id})
        return token

    async def load(self, token: str, *, touch: bool = True) -> ConsoleSession:
        """The live session of a cookie, or SessionEnded. `touch=False` for background
        polls, which must not keep an abandoned tab signed in for ever."""
        hashed = hash_token(token)
        try:
            async with self.engine.connect() as conn:
                row = (await conn.execute(_LOAD, {"hash": hashed})).first()
        except Exception as exc:
            log.error("cannot load a console session: %s", type(exc).__name__, exc_info=exc)
            raise AuthUnavailable("Sessions cannot be checked right now; retry shortly.") from None
        if row is None:
            raise SessionEnded("unknown")
        if row.ended_reason:
            raise SessionEnded(row.ended_reason)
        if row.revoked:  # revoked before the trigger existed, or by a path that bypassed it
            await self.end(token, reason="key_revoked")
            raise SessionEnded("key_revoked")
        if row.now >= row.expires_at or row.now - row.last_seen_at >= self.idle:
            await self.end(token, reason="expired")
            raise SessionEnded("expired")
        if touch and row.now - row.last_seen_at >= _TOUCH_RESOLUTION:
            async with self.engine.begin() as conn:
                await conn.execute(_TOUCH, {"hash": hashed})
        key = VerifiedKey(key_id=row.key_id, tenant_id=row.tenant_id, principal=row.principal_id,
                          scopes=frozenset(row.scopes))
        return ConsoleSession(key=key, csrf_token=csrf_token_for(token), created_at=row.created_at,
                              expires_at=row.expires_at)

    async def end(self, token: str, *, reason: str = "signed_out") -> None:
        async with self.engine.begin() as conn:
            await conn.execute(_END, {"hash": hash_token(token), "reason": reason})
