"""Idempotency-Key for mutating endpoints (IETF httpapi idempotency-key draft, Stripe's
practice): a client may retry a POST with the same key and get the first answer back
instead of a second effect.

A key is scoped to (tenant, principal, method, path) and remembered with a fingerprint of
the request body. The key is guarded and its answer stored by the use case's own
transaction, so "effect committed" and "response remembered" are one fact, and one
commit:

    use case tx   try the key's advisory lock + read its row ──┐
      │                                                        ├─ lock held elsewhere → 409 idempotency_key_in_flight
      │                                                        ├─ row, other body     → 422 idempotency_key_reused
      │                                                        └─ row                 → stored answer, Idempotent-Replayed: true
      ▼
    effect + events + INSERT the answer (ON CONFLICT DO NOTHING) ─┬─ inserted      → COMMIT
                                                                  └─ someone else's → roll back, replay theirs
      ├─ DomainError 4xx    effect rolled back; the problem is stored as the answer (own tx)
      └─ anything else      effect rolled back; no row, so a retry runs

The advisory lock lives exactly as long as the transaction: a request that dies releases
the key with its rollback, and no lease can expire under a slow one. The row is the only
proof of completion, and the unique key makes the answer's INSERT the arbiter: a request
whose snapshot missed a row committed an instant earlier finds that row at INSERT and
rolls its effect back. This module must never store a response whose effect did not
commit, nor let two runs of a use case commit for one key.
"""

from __future__ import annotations

import json
import re
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

T = TypeVar("T")

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
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

# One round trip: the key's transaction-scoped lock (namespaced apart from the event log's
# per-aggregate locks) and whatever answer is stored. The lock is tried, never waited for:
# a request still in flight is the client's concurrency bug, answered 409 at once.
_GUARD = text(
    f"""
    SELECT pg_try_advisory_xact_lock(hashtextextended(:lock_key, 0)) AS locked,
           k.request_hash, k.response_status, k.response_body, CAST(k.response_headers AS text) AS response_headers
    FROM (VALUES (1)) AS one LEFT JOIN idempotency_keys AS k ON {_PK}
    """
)
_STORE = text(
    """
    INSERT INTO idempotency_keys (tenant_id, principal, method, path, key, request_hash, status,
                                  response_status, response_body, response_headers)
    VALUES (:tenant_id, :principal, :method, :path, :key, :request_hash, 'completed',
            :status, :body, CAST(:headers AS jsonb))
    ON CONFLICT DO NOTHING
    RETURNING true
    """
)


# --- the flow ---------------------------------------------------------------------------


class _Answered(Exception):
    """The key already has an answer: roll the transaction back and give that answer."""

    def __init__(self, stored: StoredResponse) -> None:
        self.stored = stored


class _AnsweredMeanwhile(Exception):
    """Another request stored the key's answer after our read: our effect must roll back."""


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

        async def guarded_use_case(uow: UnitOfWork) -> StoredResponse:
            await self._guard(uow.session)
            stored = respond(await use_case(uow))
            if not await self._store(uow.session, stored):
                raise _AnsweredMeanwhile
            return stored

        for _ in range(3):  # a second pass finds the answer that beat us to the INSERT
            try:
                return (await run_in_transaction(sessionmaker, guarded_use_case)).to_response()
            except _Answered as answered:
                metrics.IDEMPOTENT_REPLAYS.labels(self.service_name).inc()
                return answered.stored.to_response(replayed=True)
            except _AnsweredMeanwhile:
                continue
            except (IdempotencyKeyInFlight, IdempotencyKeyReused):
                raise  # about the key, not an answer to the request: never stored
            except DomainError as exc:
                if exc.status >= 500:
                    raise
                return await self._remember_refusal(sessionmaker, error=exc)
        raise IdempotencyKeyInFlight("The Idempotency-Key is changing hands; retry shortly.",
                                     headers={"Retry-After": "1"})

    def _params(self, **more: Any) -> dict[str, Any]:
        scope = self.scope
        return {"tenant_id": scope.tenant_id, "principal": scope.principal, "method": scope.method,
                "path": scope.path, "key": self.key, **more}

    async def _guard(self, session: AsyncSession) -> None:
        """Hold the key for this transaction, or raise: 409 in flight, 422 reused, or the
        stored answer."""
        scope = self.scope
        lock_key = f"idempotency:{scope.tenant_id}:{scope.principal}:{scope.method}:{scope.path}:{self.key}"
        row = (await session.execute(_GUARD, self._params(lock_key=lock_key))).one()
        if row.request_hash is not None and row.request_hash != self.fingerprint:
            self._refuse("reused")
            raise IdempotencyKeyReused("This Idempotency-Key was already used with a different request body.")
        if row.response_status is not None:
            raise _Answered(StoredResponse(row.response_status, bytes(row.response_body),
                                           json.loads(row.response_headers)))
        if not row.locked:
            self._refuse("in_flight")
            raise IdempotencyKeyInFlight(
                "A request with this Idempotency-Key is still being processed; retry shortly.",
                headers={"Retry-After": "1"})

    async def _store(self, session: AsyncSession, stored: StoredResponse) -> bool:
        result = await session.execute(_STORE, self._params(
            request_hash=self.fingerprint, status=stored.status, body=stored.body,
            headers=orjson.dumps(stored.headers).decode()))
        return result.scalar() is not None

    async def _remember_refusal(self, sessionmaker: async_sessionmaker[AsyncSession], *, error: DomainError) -> Response:
        """A 4xx is the answer to this request too: a retry gets the same refusal. If another
        request with the key answered meanwhile, its answer is the key's answer."""
        stored = StoredResponse.of(domain_error_response(error))
        async with sessionmaker() as session, session.begin():
            if await self._store(session, stored):
                return stored.to_response()
            row = (await session.execute(text(
                f"SELECT response_status, response_body, CAST(response_headers AS text) AS response_headers "
                f"FROM idempotency_keys WHERE {_PK}"), self._params())).one()
        return StoredResponse(row.response_status, bytes(row.response_body),
                              json.loads(row.response_headers)).to_response(replayed=True)

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
