"""The request path through the gateway, for one proxied request:

    Authorization: Bearer ch_live_… ─▶ KeyStore.verify ─▶ token bucket ─▶ scope check
        ─▶ upstream request: same method, raw path and query; body under the size limit
           (read whole when small and of known length, streamed otherwise); caller's
           Authorization replaced by a fresh internal token (EdDSA JWT: tenant,
           principal, scopes, request id); Idempotency-Key,
           Content-Type, Accept, Request-Id, X-Correlation-Id forwarded; traceparent
           from the gateway's span (httpx instrumentation)
        ─▶ the service's answer, status, headers and body as they are, plus RateLimit-*

Processor webhooks take the same path without a key or a token: payments verifies their
signature, so every end-to-end header of theirs is forwarded.

This module must never forward the caller's Authorization, a tenant or principal taken
from anything but the verified key, or a body beyond its limit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import Request, Response
from opentelemetry import trace
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from gateway.errors import InsufficientScope, InvalidApiKey, MissingApiKey, PayloadTooLarge, RateLimited
from gateway.keystore import KeyStore, VerifiedKey
from gateway.ratelimit import Decision, TokenBucketLimiter
from gateway.routes import Route
from gateway.settings import Settings
from gateway.upstream import Upstreams
from shared import context
from shared.auth import sign_internal_token
from shared.errors import BadRequest, DomainError

log = logging.getLogger(__name__)

AUTH_REFUSALS = Counter("clearhouse_gateway_auth_refusals_total", "Requests refused by the gateway before any upstream",
                        ["code"])

# Answers up to this size are read whole, so a failure while reading is still a clean
# 502/504; larger ones are streamed through.
BUFFERED_RESPONSE_BYTES = 256 * 1024
# Request bodies of known length up to this size are read whole; larger or unknown-length
# bodies stream to the upstream, counted against the limit as they pass.
SMALL_BODY_BYTES = 64 * 1024
_FORWARDED = ("content-type", "accept", "idempotency-key")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade"})
# Set by the gateway itself (ids by RequestContextMiddleware, trace context by the httpx
# instrumentation), so a caller's copy is not passed along.
_OWN = frozenset({"host", "authorization", "cookie", "content-length", "accept-encoding", "request-id",
                  "x-request-id", "x-correlation-id", "traceparent", "tracestate", "x-forwarded-for"})
# Recomputed for the caller: length by us, server/date by uvicorn, ids by RequestContextMiddleware.
_NOT_RETURNED = frozenset(n.encode() for n in _HOP_BY_HOP | {"content-length", "server", "date", "request-id",
                                                             "x-correlation-id"})
_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True)
class Caller:
    key: VerifiedKey
    rate: Decision


class _BodyTooLarge(Exception):
    """Raised from the body stream while httpx sends it."""


class Gateway:
    """Everything a request needs, built once per process."""

    def __init__(self, settings: Settings, *, engine: AsyncEngine, signing_key: str) -> None:
        self.settings = settings
        self.signing_key = signing_key
        self.keys = KeyStore(engine, database_url=settings.database_url, environment=settings.key_environment,
                             ttl_s=settings.key_cache_ttl_s, max_entries=settings.key_cache_max_entries,
                             last_used_resolution_s=settings.last_used_resolution_s)
        self.limiter = TokenBucketLimiter(rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst)
        self.upstreams = Upstreams(settings)

    async def start(self) -> None:
        self.keys.start()

    async def stop(self) -> None:
        await self.keys.stop()
        await self.upstreams.aclose()

    # --- who is calling ----------------------------------------------------------------

    async def authorize(self, request: Request, *scopes: str) -> Caller:
        """The verified caller, or the 401/403/429 that stops the request here."""
        try:
            return await self._authorize(request, scopes)
        except DomainError as exc:
            AUTH_REFUSALS.labels(exc.code).inc()
            raise

    async def _authorize(self, request: Request, scopes: tuple[str, ...]) -> Caller:
        header = request.headers.get("authorization")
        if not header:
            raise MissingApiKey()
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise InvalidApiKey("Send your API key as `Authorization: Bearer <key>`.")
        key = await self.keys.verify(presented.strip())
        context.bind(tenant_id=key.tenant_id, principal=key.principal, scopes=key.scopes,
                     actor=f"user:{key.principal}")
        span = trace.get_current_span()  # the gateway's server span: the request's ids on the trace
        span.set_attribute("clearhouse.request_id", context.current().request_id or "")
        span.set_attribute("clearhouse.tenant_id", key.tenant_id)
        span.set_attribute("clearhouse.principal", key.principal)
        span.set_attribute("clearhouse.api_key_id", key.key_id)
        return self.admit(key, scopes)

    def admit(self, key: VerifiedKey, scopes: tuple[str, ...]) -> Caller:
        """A verified key's request through its rate bucket and scope check (the public API
        and the console both come this way), or the 429/403 that stops it."""
        # Counted before the scope check: a key hammering routes it may not use is limited too.
        rate = self.limiter.take(key.key_id)
        if not rate.allowed:
            raise RateLimited(f"This API key may send {self.settings.rate_limit_burst} requests at once and "
                              f"{self.settings.rate_limit_per_s:g} per second; retry after {rate.retry_after_s}s.",
                              headers=rate.headers())
        for scope in scopes:
            if scope not in key.scopes:
                raise InsufficientScope(f"This operation needs the scope {scope}.", missing_scope=scope,
                                        headers=rate.headers())
        return Caller(key=key, rate=rate)

    def internal_headers(self, caller: Caller) -> list[tuple[str, str]]:
        """Authorization (a fresh internal token) and the ids every upstream call carries."""
        ctx = context.current()
        token = sign_internal_token(self.signing_key, tenant_id=caller.key.tenant_id,
                                    principal=caller.key.principal, scopes=caller.key.scopes,
                                    request_id=ctx.request_id, ttl_s=self.settings.internal_token_ttl_s)
        return [("authorization", f"Bearer {token}"), *self.id_headers()]

    @staticmethod
    def id_headers() -> list[tuple[str, str]]:
        ctx = context.current()
        return [("request-id", ctx.request_id or ""), ("x-correlation-id", ctx.correlation_id or "")]

    # --- proxying ----------------------------------------------------------------------

    async def forward(self, request: Request, route: Route, caller: Caller | None) -> Response:
        limit = self.settings.statement_max_body_bytes if route.large_body else self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest("Content-Length must be a whole number of bytes.")
            if int(declared) > limit:
                raise PayloadTooLarge(f"The request body is larger than the {limit} bytes this endpoint accepts.")
        headers = self._upstream_headers(request, caller, declared)
        content: bytes | AsyncIterator[bytes] | None = None
        if declared is not None and int(declared) <= SMALL_BODY_BYTES:
            # Small and of known length (every JSON call): read it (the limit was checked
            # above) and send it in one piece; cheaper than driving a stream through httpx.
            content = await self._read_body(request, limit) if declared != "0" else None
        elif declared is not None or "transfer-encoding" in request.headers:
            content = self._limited_body(request, limit)
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string") or b""
        upstream_request = self.upstreams.build(route.service, request.method,
                                                raw_path + (b"?" + query if query else b""), headers=headers,
                                                content=content)
        try:
            upstream = await self.upstreams.send(route.service, upstream_request, stream=True)
        except _BodyTooLarge:
            raise PayloadTooLarge(f"The request body is larger than the {limit} bytes this endpoint accepts.") from None
        except ClientDisconnect:
            raise BadRequest("The client went away while sending the body.") from None
        response = await self._relay(route.service, upstream, head=request.method == "HEAD")
        if caller is not None:
            response.headers.update(caller.rate.headers())
        return response

    def _upstream_headers(self, request: Request, caller: Caller | None, declared: str | None) -> list:
        headers: list[tuple[str, str]]
        if caller is not None:
            headers = self.internal_headers(caller)
            for name in _FORWARDED:
                headers.extend((name, value) for value in request.headers.getlist(name))
        else:
            headers = self.id_headers()
            headers.extend((k, v) for k, v in request.headers.items() if k not in _OWN and k not in _HOP_BY_HOP)
        if declared is not None:
            headers.append(("content-length", declared))  # lets httpx send the stream un-chunked
        headers.append(("accept-encoding", request.headers.get("accept-encoding") or "identity"))
        if request.client:  # the peer we saw, never a caller's claimed chain
            headers.append(("x-forwarded-for", request.client.host))
        return headers

    @staticmethod
    async def _read_body(request: Request, limit: int) -> bytes:
        try:
            body = await request.body()
        except ClientDisconnect:
            raise BadRequest("The client went away while sending the body.") from None
        if len(body) > limit:
            raise PayloadTooLarge(f"The request body is larger than the {limit} bytes this endpoint accepts.")
        return body

    @staticmethod
    async def _limited_body(request: Request, limit: int) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _BodyTooLarge()
            if chunk:
                yield chunk

    async def _relay(self, service: str, upstream: httpx.Response, *, head: bool) -> Response:
        raw_headers = [(k.lower(), v) for k, v in upstream.headers.raw if k.lower() not in _NOT_RETURNED]
        no_body = head or upstream.status_code in _NO_BODY_STATUSES or upstream.status_code < 200
        length = upstream.headers.get("content-length")
        if no_body or (length is not None and length.isdigit() and int(length) <= BUFFERED_RESPONSE_BYTES):
            try:
                body = b"".join([chunk async for chunk in upstream.aiter_raw()])
            except httpx.HTTPError as exc:
                raise self.upstreams.failure(service, exc) from None
            finally:
                await upstream.aclose()
            response = Response(status_code=upstream.status_code)
            if no_body:
                # HEAD answers describe the GET body they do not carry: keep the service's length.
                response.body = b""
                response.raw_headers = raw_headers + ([(b"content-length", length.encode())] if length else [])
            else:
                response.body = body
                response.raw_headers = raw_headers + [(b"content-length", str(len(body)).encode())]
            return response
        response = StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                     background=BackgroundTask(upstream.aclose))
        response.raw_headers = raw_headers
        return response
