"""Internal tokens: the gateway vouches for a caller, services check the voucher.

The gateway authenticates the partner's API key, then signs a short-lived JWT (EdDSA over
Ed25519) carrying tenant, principal, scopes and the request id. Services hold only the
public key, so a compromised service cannot mint tokens. `PrincipalDep` verifies the token
on every request and binds who is acting into `shared.context`; `require_scope` guards a
route by scope.

Tenant and principal come from the verified token and nowhere else: this module must never
trust a header such as `X-Tenant-Id`, accept an unsigned (`alg: none`) or symmetric token,
or let a request with a missing, expired or foreign token reach a route.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Annotated, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastapi import Depends, Request

from shared import context
from shared.errors import Forbidden, Unauthorized

logger = logging.getLogger(__name__)

ISSUER = "clearhouse-gateway"
AUDIENCE = "clearhouse-internal"
ALGORITHM = "EdDSA"
CLOCK_SKEW = timedelta(seconds=5)  # gateway and service clocks drift a little; tokens live ~60 s
_REQUIRED_CLAIMS = ["iss", "aud", "sub", "iat", "exp", "jti", "tenant", "scopes", "rid"]


class InvalidInternalToken(Unauthorized):
    code = "invalid_internal_token"
    title = "Invalid internal token"

    def __init__(self, detail: str) -> None:
        # RFC 9110: a 401 names the scheme the client should use.
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class InsufficientScope(Forbidden):
    code = "insufficient_scope"
    title = "Insufficient scope"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    principal: str
    scopes: frozenset[str]
    request_id: str

    @property
    def actor(self) -> str:
        return f"user:{self.principal}"


def generate_keypair() -> tuple[str, str]:
    """(private_pem, public_pem) for a fresh Ed25519 key: the gateway keeps the first."""
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem.decode(), public_pem.decode()


@lru_cache(maxsize=8)
def _private_key(private_pem: str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the internal token signing key must be an Ed25519 private key")
    return key


@lru_cache(maxsize=8)
def _public_key(public_pem: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(public_pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the internal token verification key must be an Ed25519 public key")
    return key


def sign_internal_token(
    private_pem: str,
    *,
    tenant_id: str,
    principal: str,
    scopes: Iterable[str],
    request_id: str,
    ttl_s: int = 60,
) -> str:
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    now = datetime.now(timezone.utc)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": principal,
        "tenant": tenant_id,
        "scopes": sorted(set(scopes)),
        "rid": request_id,
        "iat": now,
        "exp": now + timedelta(seconds=ttl_s),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, _private_key(private_pem), algorithm=ALGORITHM)


def verify_internal_token(public_pem: str, token: str) -> Principal:
    """The principal the gateway vouched for, or InvalidInternalToken (401) for anything
    wrong. The reason goes to the log, never to the caller."""
    try:
        claims = jwt.decode(
            token,
            _public_key(public_pem),
            algorithms=[ALGORITHM],  # a pinned list: "none" and HS256-with-the-public-key are refused
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway=CLOCK_SKEW,
            options={"require": _REQUIRED_CLAIMS},
        )
        return _principal_from(claims)
    except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
        logger.info("internal token refused: %s", exc)
        raise InvalidInternalToken("The internal token is missing, expired or not valid for this service.") from None


def _principal_from(claims: dict[str, Any]) -> Principal:
    tenant, principal, request_id, scopes = claims["tenant"], claims["sub"], claims["rid"], claims["scopes"]
    if not all(isinstance(v, str) and v for v in (tenant, principal, request_id)):
        raise ValueError("tenant, sub and rid must be non-empty strings")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ValueError("scopes must be a list of strings")
    return Principal(tenant_id=tenant, principal=principal, scopes=frozenset(scopes), request_id=request_id)


# --- FastAPI -------------------------------------------------------------------------


def _bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidInternalToken("A bearer internal token is required.")
    return token.strip()


async def current_principal(request: Request) -> Principal:
    """Verify the bearer token with the app's public key and bind who is acting."""
    public_key = getattr(request.app.state, "internal_token_public_key", None)
    if not public_key:
        # Misconfiguration must fail closed: nobody gets in, and operators hear about it.
        logger.error("no internal token public key configured; refusing every authenticated request")
        raise InvalidInternalToken("This service cannot verify internal tokens.")
    found = verify_internal_token(public_key, _bearer_token(request))
    context.bind(tenant_id=found.tenant_id, principal=found.principal, scopes=found.scopes, actor=found.actor)
    return found


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def require_scope(*scopes: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that lets the request through only if the token grants every scope:
    `principal: Annotated[Principal, Depends(require_scope("ledger:write"))]`."""
    if not scopes:
        raise ValueError("require_scope needs at least one scope")

    async def check_scopes(principal: PrincipalDep) -> Principal:
        missing = [scope for scope in scopes if scope not in principal.scopes]
        if missing:
            raise InsufficientScope(f"This operation needs the scope {missing[0]}.", missing_scope=missing[0])
        return principal

    return check_scopes
