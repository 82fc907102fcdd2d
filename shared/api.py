"""`create_app`: the one way every Clearhouse service builds its FastAPI application, so
all of them answer errors, ids, limits, health and metrics the same way.

    request ─▶ RequestContextMiddleware   request/correlation ids, context, metrics, last-resort 500
             ─▶ BodyLimitMiddleware         413 on Content-Length or while the body streams
             ─▶ FastAPI (problem handlers)  routes; their routers require an internal token

It holds no business rules and must never answer with a stack trace, SQL or an exception's
text, nor let a route of `routers` run without a verified internal token.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from starlette.requests import ClientDisconnect
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import context, metrics
from shared.auth import current_principal
from shared.db import make_engine, make_sessionmaker
from shared.errors import (
    PayloadTooLarge, ServiceUnavailable, domain_error_response, install_problem_handlers, unhandled_error_response,
)
from shared.health import check_summary, failure_detail, run_checks, standard_checks
from shared.settings import KitSettings

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
PROBE_TIMEOUT_S = 2.0
# Ids we echo and log: printable ASCII without spaces, bounded, so a caller cannot inject
# log lines or oversized headers through them. Anything else is replaced by a fresh id.
_ACCEPTABLE_ID = re.compile(r"[\x21-\x7e]{1,128}")
_ECHOED_HEADERS = frozenset({b"request-id", b"x-correlation-id"})
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def create_app(
    *,
    service_name: str,
    settings: KitSettings,
    routers: Sequence[APIRouter],
    engine: AsyncEngine | None = None,
    sessionmaker: async_sessionmaker[AsyncSession] | None = None,
    version: str = "1",
    public_routers: Sequence[APIRouter] = (),
    migrations_dir: Path | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    broker_bootstrap: str | None = None,
) -> FastAPI:
    """Build a service's app. Every route in `routers` requires a valid internal token;
    `public_routers` (e.g. processor webhooks, verified their own way) do not.
    `/readyz` checks the database answers, is at the head of `migrations_dir` when one is
    given, and reports whether the broker at `broker_bootstrap` answers when one is given
    (advisory for an API: see `answer_readiness`)."""
    if engine is None:
        engine = make_engine(settings.database_url, pool_size=settings.db_pool_size, application_name=service_name)
    if sessionmaker is None:
        sessionmaker = make_sessionmaker(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.dispose()

    app = FastAPI(title=service_name, version=version, lifespan=lifespan)
    app.state.service_name = service_name
    app.state.engine = engine
    app.state.sessionmaker = sessionmaker
    public_key = settings.internal_token_public_key
    app.state.internal_token_public_key = public_key.get_secret_value() if public_key else None

    install_problem_handlers(app)
    for router in routers:
        app.include_router(router, dependencies=[Depends(current_principal)])
    for router in public_routers:
        app.include_router(router)
    app.include_router(_operational_router(service_name=service_name, engine=engine, migrations_dir=migrations_dir,
                                           broker_bootstrap=broker_bootstrap))

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    app.add_middleware(RequestContextMiddleware, service_name=service_name)  # added last = outermost
    return app


def get_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    return request.app.state.sessionmaker


SessionmakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)]


# --- request context, ids and metrics --------------------------------------------------


def _acceptable_id(value: str | None) -> str | None:
    return value if value and _ACCEPTABLE_ID.fullmatch(value) else None


def route_template(scope: Scope) -> str:
    """The matched route's path template ("/v1/accounts/{id}"), never the raw path: the
    raw path holds ids and would give the metric one series per object."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, service_name: str) -> None:
        self.app = app
        self.service_name = service_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = _acceptable_id(headers.get("request-id") or headers.get("x-request-id")) or uuid.uuid4().hex
        correlation_id = _acceptable_id(headers.get("x-correlation-id")) or request_id
        echoed = [(b"request-id", request_id.encode()), (b"x-correlation-id", correlation_id.encode())]
        response_status, response_started = 500, False

        async def send_with_ids(message: Message) -> None:
            nonlocal response_status, response_started
            if message["type"] == "http.response.start":
                response_status, response_started = message["status"], True
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _ECHOED_HEADERS]
                message = {**message, "headers": kept + echoed}
            await send(message)

        token = context.start(request_id=request_id, correlation_id=correlation_id)
        started_at = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_ids)
        except ClientDisconnect:
            # The client hung up before its request body arrived (a sender's timeout): no
            # use case ran and nobody is left to answer. Counted as 499 (nginx's "client
            # closed request"), not as an error of ours.
            response_status = 499
            logger.info("client disconnected before its %s %s was read", scope["method"], scope["path"])
        except Exception as exc:
            # Caught here rather than in Starlette's ServerErrorMiddleware so the 500 still
            # carries the ids, is counted, and the traceback is logged exactly once.
            response = unhandled_error_response(exc, method=scope["method"], path=scope["path"])
            if response_started:
                raise
            await response(scope, receive, send_with_ids)
        finally:
            self._observe(scope, response_status, time.perf_counter() - started_at)
            context.reset(token)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        method = scope["method"] if scope["method"] in _KNOWN_METHODS else "OTHER"
        route = route_template(scope)
        metrics.HTTP_REQUESTS.labels(self.service_name, method, route, str(status)).inc()
        metrics.HTTP_LATENCY.labels(self.service_name, method, route).observe(seconds)


# --- request body limit ------------------------------------------------------------------


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` while the body streams. An HTTPException on purpose: FastAPI
    re-raises those from body parsing (anything else it would turn into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=_too_large_detail(limit))


def _too_large_detail(limit: int) -> str:
    return f"The request body is larger than the {limit} bytes this endpoint accepts."


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        too_large = domain_error_response(PayloadTooLarge(_too_large_detail(limit)))
        declared = Headers(scope=scope).get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            await too_large(scope, receive, send)  # refused before a byte of it is read
            return
        received, response_started = 0, False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            # Read outside FastAPI's exception handling (e.g. by another middleware).
            if response_started:
                raise
            await too_large(scope, receive, send)


# --- health, readiness, metrics ----------------------------------------------------------


class NotReady(ServiceUnavailable):
    code = "not_ready"
    title = "Not ready"


def _operational_router(*, service_name: str, engine: AsyncEngine, migrations_dir: Path | None,
                        broker_bootstrap: str | None) -> APIRouter:
    router = APIRouter(tags=["operations"])
    checks = standard_checks(engine=engine, migrations_dir=migrations_dir, bootstrap=broker_bootstrap)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up and serving."""
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> dict:
        """The database answers at the schema this code expects (503 problem+json naming
        each failed check otherwise); the broker's state is reported, not required."""
        return await answer_readiness(checks, advisory=API_ADVISORY_CHECKS)

    @router.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        await _refresh_outbox_gauges(engine, service_name)
        payload, content_type = metrics.metrics_payload()
        return Response(content=payload, media_type=content_type)

    return router


# An API writes its events to its own database (the outbox); the broker is not on its
# request path. Taking every API out of rotation while Kafka is down would turn a broker
# outage into a full outage of the platform, when the outbox exists precisely so that
# writes go on and are published once the broker is back. So an API reports the broker
# ("degraded") but stays ready; the relay and consumer, which need it, are not ready.
API_ADVISORY_CHECKS = frozenset({"broker"})


async def answer_readiness(checks, *, advisory: frozenset[str] = frozenset()) -> dict:
    """The body of a passing `/readyz` (`degraded` when an advisory check failed), or
    NotReady naming every failed required check."""
    results = await run_checks(checks)
    detail = failure_detail({name: reason for name, reason in results.items() if name not in advisory})
    if detail:
        raise NotReady(detail, checks=check_summary(results))
    degraded = any(results[name] for name in advisory if name in results)
    return {"status": "degraded" if degraded else "ready", "checks": check_summary(results)}


async def _refresh_outbox_gauges(engine: AsyncEngine, service_name: str) -> None:
    """One cheap query (partial index on unpublished events) per scrape."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S), engine.connect() as conn:
            backlog, oldest_age = (await conn.execute(text(
                "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(occurred_at)), 0) "
                "FROM events WHERE published_at IS NULL"
            ))).one()
    except Exception as exc:  # a scrape must still answer with every other metric
        logger.warning("could not refresh outbox gauges: %s", type(exc).__name__, exc_info=exc)
        return
    metrics.OUTBOX_BACKLOG.labels(service_name).set(backlog)
    metrics.OUTBOX_OLDEST_AGE.labels(service_name).set(float(oldest_age))
