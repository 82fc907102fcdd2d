"""API keys: their format, and the administration behind `clearhouse keys create|list|revoke`.

    ch_live_k7q2m9x4a1b8c3d5_Xq3...(43 chars)
    └prefix┘└── key id ───┘ └─ secret (256 bits, url-safe base64) ─┘

The key id is public (it names the key in lists, logs and the database); the secret is
shown once, when the key is created, and stored only as its sha256 (the one exception:
`ensure_demo_key` keeps the laptop demo key of `clearhouse up` in a 0600 file). A sha256 is enough
here, unlike for passwords: 256 random bits cannot be guessed, so there is nothing for a
slow hash to protect against. Comparison is constant-time (`secret_matches`).

A key belongs to a principal in a tenant; its scopes are a subset of the principal's (the
principal's scopes are a ceiling: narrowing them narrows every key at once). These
functions connect with the gateway database's *owner* role (its migration URL): the
gateway's runtime role may read keys but never create or revoke one. They must never
print, log or store a secret other than in the return value of `create_key` (and the
demo key's file).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import string
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from shared.db import plain_url

# The contract's eight, plus the two the approvals service guards generic requests and
# policy changes with. The table CHECKs only the shape `<service>:<verb>`, so a scope a
# service adds needs a line here, not a migration.
SCOPES = ("payments:read", "payments:write", "approvals:read", "approvals:decide", "approvals:request",
          "approvals:admin", "ledger:read", "ledger:write", "reconciliation:read", "reconciliation:write")
ENVIRONMENTS = ("live", "test")
KEY_ID_LENGTH = 16
_KEY_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_BYTES = 32
_KEY = re.compile(r"ch_(live|test)_([a-z0-9]{16})_([A-Za-z0-9_-]{43})")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}")  # the same rule as the tables' CHECKs


@dataclass(frozen=True)
class ParsedKey:
    environment: str
    key_id: str
    secret: str


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never its secret."""

    id: str
    prefix: str  # "ch_live_<id>", enough for a person to recognise the key
    tenant: str
    principal: str
    scopes: list[str]
    name: str | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    def as_json(self) -> dict:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items()}


def parse_key(presented: str) -> ParsedKey | None:
    """The parts of a well-formed key, or None. Says nothing about whether it exists."""
    match = _KEY.fullmatch(presented)
    if match is None:
        return None
    return ParsedKey(environment=match[1], key_id=match[2], secret=match[3])


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def secret_matches(secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def new_key(environment: str = "live") -> tuple[str, ParsedKey]:
    if environment not in ENVIRONMENTS:
        raise ValueError(f"environment must be one of {', '.join(ENVIRONMENTS)}")
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return f"ch_{environment}_{key_id}_{secret}", ParsedKey(environment, key_id, secret)


def check_scopes(scopes) -> list[str]:
    wanted = sorted({s.strip() for s in scopes if s.strip()})
    if not wanted:
        raise ValueError("a key needs at least one scope")
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    return wanted


def _check_id(kind: str, value: str) -> str:
    if not _ID.fullmatch(value or ""):
        raise ValueError(f"{kind} {value!r} is not valid: 1-128 of letters, digits and _ . @ : - (starting alnum)")
    return value


async def create_key(
    database_url: str, *, tenant: str, principal: str, scopes, environment: str = "live", name: str | None = None,
) -> str:
    """Create a key and return it: the only time its secret exists outside the caller's
    hands. A new tenant or principal is created on the way, the principal with exactly
    these scopes; an existing principal must already hold every scope asked for."""
    _check_id("tenant", tenant)
    _check_id("principal", principal)
    wanted = check_scopes(scopes)
    key, parsed = new_key(environment)
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING", tenant)
            await conn.execute("INSERT INTO principals (tenant_id, id, scopes) VALUES ($1, $2, $3) "
                               "ON CONFLICT DO NOTHING", tenant, principal, wanted)
            # FOR SHARE: a concurrent narrowing of the principal's scopes waits for this key.
            held = await conn.fetchval("SELECT scopes FROM principals WHERE tenant_id = $1 AND id = $2 FOR SHARE",
                                       tenant, principal)
            beyond = [s for s in wanted if s not in held]
            if beyond:
                raise ValueError(f"principal {principal} of tenant {tenant} does not hold {', '.join(beyond)} "
                                 f"(it holds {', '.join(held) or 'no scope'})")
            await conn.execute(
                "INSERT INTO api_keys (id, tenant_id, principal_id, environment, secret_hash, scopes, name) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                parsed.key_id, tenant, principal, environment, hash_secret(parsed.secret), wanted, name,
            )
    finally:
        await conn.close()
    return key


_SELECT_KEYS = """
    SELECT id, environment, tenant_id, principal_id, scopes, name, created_at, last_used_at, revoked_at
    FROM api_keys
"""


def _info(row) -> KeyInfo:
    return KeyInfo(id=row["id"], prefix=f"ch_{row['environment']}_{row['id']}", tenant=row["tenant_id"],
                   principal=row["principal_id"], scopes=list(row["scopes"]), name=row["name"],
                   created_at=row["created_at"], last_used_at=row["last_used_at"], revoked_at=row["revoked_at"])


async def list_keys(
    database_url: str, *, tenant: str | None = None, principal: str | None = None, include_revoked: bool = False,
) -> list[KeyInfo]:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        rows = await conn.fetch(
            _SELECT_KEYS + " WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::text IS NULL OR principal_id = $2)"
            " AND ($3 OR revoked_at IS NULL) ORDER BY tenant_id, principal_id, created_at",
            tenant, principal, include_revoked,
        )
    finally:
        await conn.close()
    return [_info(row) for row in rows]


def key_id_of(key_or_id: str) -> str:
    """Accepts the key id, its prefix form `ch_live_<id>`, or the whole key."""
    parsed = parse_key(key_or_id)
    if parsed:
        return parsed.key_id
    candidate = re.sub(r"^ch_(live|test)_", "", key_or_id).split("_", 1)[0]
    if not re.fullmatch(r"[a-z0-9]{16}", candidate):
        raise ValueError(f"{key_or_id[:24]!r} is not an API key id")
    return candidate


async def ensure_demo_key(database_url: str, path: Path, *, tenant: str = "demo", principal: str = "demo",
                          environment: str = "live") -> str:
    """For `clearhouse up`: the demo key kept in `path` (mode 0600) while it still works,
    else a new one with every scope, written there. Each start does not mint another key."""
    if path.exists():
        kept = path.read_text().strip()
        parsed = parse_key(kept)
        if parsed:
            conn = await asyncpg.connect(plain_url(database_url))
            try:
                row = await conn.fetchrow("SELECT secret_hash, revoked_at FROM api_keys WHERE id = $1",
                                          parsed.key_id)
            finally:
                await conn.close()
            if row and row["revoked_at"] is None and secret_matches(parsed.secret, bytes(row["secret_hash"])):
                return kept
    key = await create_key(database_url, tenant=tenant, principal=principal, scopes=SCOPES, environment=environment,
                           name="clearhouse up demo key")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


async def revoke_key(database_url: str, key: str) -> KeyInfo:
    """Revoke a key (by id, prefix or whole key). Every gateway stops accepting it as soon
    as the commit's notification reaches it; revoking twice keeps the first time."""
    key_id = key_id_of(key)
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        await conn.execute("UPDATE api_keys SET revoked_at = clock_timestamp() WHERE id = $1 AND revoked_at IS NULL",
                           key_id)
        row = await conn.fetchrow(_SELECT_KEYS + " WHERE id = $1", key_id)
    finally:
        await conn.close()
    if row is None:
        raise ValueError(f"no API key with id {key_id}")
    return _info(row)
