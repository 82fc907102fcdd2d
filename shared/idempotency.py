"""Idempotency-Key for mutating endpoints (IETF httpapi idempotency-key draft, Stripe's
practice): a client may retry a POST with the same key and get the first answer back
instead of a second effect.

A key is scoped to (tenant, principal, method, path) and remembered with a fingerprint of
the request body. The stored response is written by the use case's own transaction, so
"effect committed" and "response remembered" are one fact:

    claim (own tx)    INSERT in_flight, lock 60 s ──┐ row exists?
      │                                             ├─ other body            → 422 idempotency_key_reused
      │                                             ├─ completed             → stored answer, Idempotent-Replayed: true
      │                                             ├─ in flight, locked     → 409 idempotency_key_in_flight
      │                                             └─ in flight, lock over  → take it over (its holder died)
      ▼
    use case (one tx) effect + events + UPDATE key → completed with status/body/headers, COMMIT
      ├─ DomainError 4xx    effect rolled back; the problem is stored as the answer (own tx)
      └─ anything else      effect rolled back; the claim is released so a retry runs

Only the holder of the claim's `lock_token` may complete it, so even a use case that
outlives its lock cannot apply the effect twice. This module must never store a response
whose effect did not commit, nor let two runs of a use case commit for one key.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from hashlib import sha256
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request, Response
from fastapi.encoders import jsonable_encoder
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import metrics
from shared.auth import PrincipalDep
from shared.errors import BadRequest, Conflict, DomainError, ValidationFailed, domain_error_response
from shared.uow import UnitOfWork, run_in_transaction

logger = logging.getLogger(__name__)

T = TypeVar("T")

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
LOCK_TTL = timedelta(seconds=60)
MIN_RETENTION = timedelta(hours=24)  # the promise to clients: a retry within a day is safe
_VALID_KEY = re.compile(r"[\x20-\x7e]{1,255}")
# Headers that describe the bytes, recomputed by whoever sends the response.
_UNSTORED_HEADERS = frozenset({"content-length"})


class InvalidIdempotencyKey(BadRequest):
    code = "invalid_idempotency_key"
    title = "Invalid Idempotency-Key"


class IdempotencyKeyReused(ValidationFailed):
    code = "idempotency_key_reused"
    title = "Idempotency-Key reused"


class IdempotencyKeyInFlight(Conflict):
    code = "idempotency_key_in_flight"
    title = "Idempotency-Key in flight"


class _ClaimLost(Exception):
    """Our lock expired and another request took the key over: our effect must roll back."""


@dataclass(frozen=True)
class IdempotencyScope:
    tenant_id: str
    principal: str
    method: str
    path: str


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: bytes
    headers: dict[str, str]

    def to_response(self, *, replayed: bool = False) -> Response:
        headers = dict(self.headers)
        if replayed:
            headers[REPLAYED_HEADER] = "true"
        return Response(content=self.body, status_code=self.status, headers=headers)

    @classmethod
    def of(cls, response: Response) -> StoredResponse:
        headers = {k: v for k, v in response.headers.items() if k not in _UNSTORED_HEADERS}
        return cls(status=response.status_code, body=bytes(response.body), headers=headers)


def request_fingerprint(body: bytes) -> str:
    """sha256 of the body in canonical JSON (sorted keys, no whitespace), so a client that
    re-serialises the same payload differently is still recognised; raw bytes otherwise."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:  # not JSON (or not UTF-8): the bytes themselves are the payload
        canonical = body
    return sha256(canonical).hexdigest()


def parse_key(values: list[str]) -> str | None:
    """The key, or None when the header is absent. The draft sends it as a structured-field
    string (`"abc"`); a bare token (`abc`, Stripe's form) means the same key."""
    if not values:
        return None
    if len(values) > 1:
        raise InvalidIdempotencyKey("Send exactly one Idempotency-Key header.")
    key = values[0]
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not _VALID_KEY.fullmatch(key):
        raise InvalidIdempotencyKey("An Idempotency-Key is 1 to 255 printable ASCII characters.")
    return key


def json_body(result: Any) -> Any:
    """Default `serialize`: pydantic models, dataclasses, UUIDs, datetimes to JSON values."""
    return jsonable_encoder(result)


# --- SQL ----------------------------------------------------------------------------------

_PK = "tenant_id = :tenant_id AND principal = :principal AND method = :method AND path = :path AND key = :key"

_INSERT_CLAIM = text(
    """
    INSERT INTO idempotency_keys (tenant_id, principal, method, path, key, request_hash, status,
                                  locked_until, lock_token)
    VALUES (:tenant_id, :principal, :method, :path, :key, :request_hash, 'in_flight',
            clock_timestamp() + make_interval(secs => :ttl), :token)
    ON CONFLICT DO NOTHING
    RETURNING true
    """
)
# FOR UPDATE: two requests racing to take over an expired claim queue here; the second sees
# the first one's fresh lock. It also waits out a use case that is completing the key.
_SELECT_EXISTING = text(
    f"""
    SELECT request_hash, status, response_status, response_body, CAST(response_headers AS text) AS response_headers,
           locked_until > clock_timestamp() AS locked
    FROM idempotency_keys WHERE {_PK} FOR UPDATE
    """
)
_TAKE_OVER = text(
    f"UPDATE idempotency_keys SET locked_until = clock_timestamp() + make_interval(secs => :ttl), "
    f"lock_token = :token WHERE {_PK}"
)
_COMPLETE = text(
    f"""
    UPDATE idempotency_keys
    SET status = 'completed', response_status = :status, response_body = :body,
        response_headers = CAST(:headers AS jsonb), locked_until = NULL, lock_token = NULL
    WHERE {_PK} AND status = 'in_flight' AND lock_token = :token
    """
)
_RELEASE = text(f"DELETE FROM idempotency_keys WHERE {_PK} AND status = 'in_flight' AND lock_token = :token")


# --- the flow ---------------------------------------------------------------------------


class Idempotency:
    """What a route gets from `IdempotencyDep`: `return await idem.run(sessionmaker, use_case)`."""

    def __init__(self, *, key: str | None, scope: IdempotencyScope, fingerprint: str, service_name: str) -> None:
        self.key = key
        self.scope = scope
        self.fingerprint = fingerprint
        self.service_name = service_name

    async def run(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        use_case: Callable[[UnitOfWork], Awaitable[T]],
        *,
        status_code: int = 201,
        serialize: Callable[[T], Any] = json_body,
        headers: Callable[[T], Mapping[str, str]] | None = None,
    ) -> Response:
        """Run `use_case` at most once per key and answer with its (stored) response.
        `headers(result)` adds response headers such as Location; they are replayed too."""

        def respond(result: T) -> StoredResponse:
            extra = dict(headers(result)) if headers else {}
            if status_code == 204:
                return StoredResponse(status_code, b"", extra)
            body = orjson.dumps(serialize(result))
            return StoredResponse(status_code, body, {"content-type": "application/json", **extra})

        if self.key is None:
            return respond(await run_in_transaction(sessionmaker, use_case)).to_response()

        claim = await self._claim(sessionmaker)
        if isinstance(claim, StoredResponse):
            metrics.IDEMPOTENT_REPLAYS.labels(self.service_name).inc()
            return claim.to_response(replayed=True)

        async def use_case_and_record(uow: UnitOfWork) -> StoredResponse:
            stored = respond(await use_case(uow))
            if not await self._complete(uow.session, token=claim, stored=stored):
                raise _ClaimLost
            return stored

        try:
            stored = await run_in_transaction(sessionmaker, use_case_and_record)
        except _ClaimLost:
            raise IdempotencyKeyInFlight("Another request with this Idempotency-Key took over.",
                                         headers={"Retry-After": "1"}) from None
        except DomainError as exc:
            if exc.status >= 500:
                await self._release(sessionmaker, token=claim)
                raise
            return await self._remember_refusal(sessionmaker, token=claim, error=exc)
        except Exception:
            await self._release(sessionmaker, token=claim)
            raise
        return stored.to_response()

    def _params(self, **more: Any) -> dict[str, Any]:
        scope = self.scope
        return {"tenant_id": scope.tenant_id, "principal": scope.principal, "method": scope.method,
                "path": scope.path, "key": self.key, **more}

    async def _claim(self, sessionmaker: async_sessionmaker[AsyncSession]) -> uuid.UUID | StoredResponse:
        """A lock token if this request may run the use case, else the stored answer."""
        ttl = LOCK_TTL.total_seconds()
        for _ in range(3):  # a row can vanish between INSERT and SELECT only by a purge
            token = uuid.uuid4()
            async with sessionmaker() as session, session.begin():
                claim_params = self._params(request_hash=self.fingerprint, ttl=ttl, token=token)
                if (await session.execute(_INSERT_CLAIM, claim_params)).scalar():
                    return token
                row = (await session.execute(_SELECT_EXISTING, self._params())).one_or_none()
                if row is None:
                    continue
                if row.request_hash != self.fingerprint:
                    self._refuse("reused")
                    raise IdempotencyKeyReused(
                        "This Idempotency-Key was already used with a different request body.")
                if row.status == "completed":
                    return StoredResponse(row.response_status, bytes(row.response_body),
                                          json.loads(row.response_headers))
                if row.locked:
                    self._refuse("in_flight")
                    raise IdempotencyKeyInFlight(
                        "A request with this Idempotency-Key is still being processed; retry shortly.",
                        headers={"Retry-After": "1"})
                # The holder died: its effect rolled back with it, so running again is safe.
                await session.execute(_TAKE_OVER, self._params(ttl=ttl, token=token))
                return token
        raise IdempotencyKeyInFlight("The Idempotency-Key is changing hands; retry shortly.",
                                     headers={"Retry-After": "1"})

    async def _complete(self, session: AsyncSession, *, token: uuid.UUID, stored: StoredResponse) -> bool:
        result = await session.execute(_COMPLETE, self._params(
            token=token, status=stored.status, body=stored.body, headers=orjson.dumps(stored.headers).decode()))
        return result.rowcount == 1

    async def _remember_refusal(
        self, sessionmaker: async_sessionmaker[AsyncSession], *, token: uuid.UUID, error: DomainError
    ) -> Response:
        """A 4xx is the answer to this request too: a retry gets the same refusal."""
        stored = StoredResponse.of(domain_error_response(error))
        async with sessionmaker() as session, session.begin():
            await self._complete(session, token=token, stored=stored)
        return stored.to_response()

    async def _release(self, sessionmaker: async_sessionmaker[AsyncSession], *, token: uuid.UUID) -> None:
        try:
            async with sessionmaker() as session, session.begin():
                await session.execute(_RELEASE, self._params(token=token))
        except Exception:  # the original error matters more; the lock expires by itself
            logger.warning("could not release Idempotency-Key claim; it frees itself when its lock expires",
                           exc_info=True)

    def _refuse(self, reason: str) -> None:
        metrics.IDEMPOTENCY_CONFLICTS.labels(self.service_name, reason).inc()


async def idempotency(request: Request, principal: PrincipalDep) -> Idempotency:
    """FastAPI dependency. Depends on the verified principal, never on caller-sent ids."""
    key = parse_key(request.headers.getlist(KEY_HEADER))
    scope = IdempotencyScope(tenant_id=principal.tenant_id, principal=principal.principal,
                             method=request.method, path=request.url.path)
    fingerprint = request_fingerprint(await request.body()) if key is not None else ""
    service_name = getattr(request.app.state, "service_name", request.app.title)
    return Idempotency(key=key, scope=scope, fingerprint=fingerprint, service_name=service_name)


IdempotencyDep = Annotated[Idempotency, Depends(idempotency)]


async def purge_expired_keys(
    sessionmaker: async_sessionmaker[AsyncSession], *, older_than: timedelta = timedelta(hours=48)
) -> int:
    """Forget keys first seen more than `older_than` ago (never less than 24 h); returns how many."""
    if older_than < MIN_RETENTION:
        raise ValueError(f"keys are kept at least {MIN_RETENTION}")
    async with sessionmaker() as session, session.begin():
        result = await session.execute(
            text("DELETE FROM idempotency_keys WHERE created_at < clock_timestamp() - make_interval(secs => :age)"),
            {"age": older_than.total_seconds()},
        )
        return result.rowcount
