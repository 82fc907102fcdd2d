"""The gateway's HTTP application: `create_app(settings)` for uvicorn
(`clearhouse serve gateway`).

    RequestContextMiddleware   Request-Id / X-Correlation-Id, metrics, last-resort problem
      FastAPI (problem+json handlers, OpenTelemetry server span = the trace's root)
        /healthz /readyz /metrics            operations
        /openapi.json /docs                   the merged public API document
        GET /v1/payments/{id}/timeline       composed (composition.py)
        GET /v1/payments/{id}[?expand=...]   proxied, or composed when expanding
        /v1/{payments|approvals|ledger|reconciliation}/...   proxied (proxy.py)
        /console/...                          the operations console (gateway/console)

It refuses to start without the internal-token signing key: a gateway that cannot sign
would turn every request into a 401 from the services.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import orjson
from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse

from gateway import composition
from gateway.console import install as install_console
from gateway.errors import GATEWAY_ERRORS, NotFound
from gateway.openapi import OpenApiMerger
from gateway.proxy import Gateway
from gateway.routes import PROXIED_METHODS, resolve
from gateway.settings import Settings
from shared import metrics
from shared.api import RequestContextMiddleware, answer_readiness
from shared.auth import sign_internal_token
from shared.db import make_engine
from shared.errors import install_problem_handlers, problem_responses
from shared.health import standard_checks
from shared.logs import setup_logging
from shared.telemetry import instrument_app, instrument_engine, instrument_httpx, setup_telemetry

log = logging.getLogger(__name__)

SERVICE = "gateway"
MIGRATIONS = Path(__file__).parent / "migrations"
PaymentId = Annotated[str, PathParam(min_length=1, max_length=64, description="The payment's id")]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    signing_key = settings.signing_key()
    if not signing_key:
        raise ValueError("the gateway needs INTERNAL_TOKEN_PRIVATE_KEY or INTERNAL_TOKEN_PRIVATE_KEY_FILE "
                         "(the Ed25519 key whose public half the services verify)")
    # Fail at start, not on the first request, if the key is not a usable Ed25519 key.
    sign_internal_token(signing_key, tenant_id="startup", principal="startup", scopes=[], request_id="startup")

    setup_logging(SERVICE, level=settings.log_level, role="api")
    # httpx logs every call at INFO; the upstream metrics and spans already say it, and a
    # line per proxied request would double the log volume of the busiest process.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    setup_telemetry(SERVICE, role="api")
    instrument_httpx()
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size, application_name="gateway-api")
    instrument_engine(engine)
    gateway = Gateway(settings, engine=engine, signing_key=signing_key)
    readiness_checks = standard_checks(engine=engine, migrations_dir=MIGRATIONS, bootstrap=None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        # Warm the merged document in the background: services may still be starting.
        warm = asyncio.create_task(merger.document())
        try:
            yield
        finally:
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)
            if console_health is not None:
                await console_health.aclose()
            await gateway.stop()
            await engine.dispose()

    app = FastAPI(title="Clearhouse API", version="1", lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.settings = settings
    app.state.gateway = gateway
    app.state.service_name = SERVICE
    install_problem_handlers(app)
    merger = OpenApiMerger(base=lambda: _own_document(app), upstreams=gateway.upstreams,
                           ttl_s=settings.openapi_cache_ttl_s, retry_s=settings.openapi_retry_s)
    app.state.openapi_merger = merger

    # --- operations --------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> dict:
        """The key database answers at the expected schema. Neither upstreams nor the
        broker are checked: the gateway never talks to Kafka, and one service down must
        not take the door to the others off the load balancer."""
        return await answer_readiness(readiness_checks)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        payload, content_type = metrics.metrics_payload()
        return Response(content=payload, media_type=content_type)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document() -> Response:
        return Response(orjson.dumps(await merger.document()), media_type="application/json")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Clearhouse API")

    # --- composed ------------------------------------------------------------------------

    @app.get("/v1/payments/{payment_id}/timeline", response_model=composition.PaymentTimeline,
             tags=["payments"], operation_id="gateway_payment_timeline",
             responses={206: {"model": composition.PaymentTimeline,
                              "description": "Partial: a service's part is missing (`partial`, `missing`)"},
                        **problem_responses(404, *(e for e in GATEWAY_ERRORS if e.status != 413))})
    async def payment_timeline(request: Request, payment_id: PaymentId) -> Response:
        """The payment's history across payments, approvals, ledger and reconciliation,
        oldest first, with actors and trace ids."""
        caller = await gateway.authorize(request, "payments:read")
        response = await composition.payment_timeline(gateway, caller, payment_id)
        response.headers.update(caller.rate.headers())
        return response

    @app.get("/v1/payments/{payment_id}", include_in_schema=False)
    async def payment(request: Request, payment_id: str,
                      expand: Annotated[list[str] | None, Query(max_length=4)] = None) -> Response:
        if not expand:
            return await _proxy(request)
        wanted = composition.parse_expand(expand)
        # Embedding reads the other services' data: it needs their read scopes too.
        caller = await gateway.authorize(request, "payments:read",
                                         *(composition.EXPANSIONS[name][1] for name in wanted))
        response = await composition.payment_with_expansions(gateway, caller, payment_id, wanted)
        response.headers.update(caller.rate.headers())
        return response

    # --- the operations console (gateway/console): HTML for people, not in the API document

    console_health = install_console(app, engine=engine, settings=settings) if settings.console_enabled else None

    # --- proxied -------------------------------------------------------------------------

    async def _proxy(request: Request) -> Response:
        route = resolve(request.method, request.url.path)
        if route is None:
            raise NotFound("No public API lives at this path.")
        caller = await gateway.authorize(request, route.scope) if route.scope else None
        return await gateway.forward(request, route, caller)

    app.add_api_route("/v1/{path:path}", _proxy, methods=PROXIED_METHODS, include_in_schema=False)

    app.add_middleware(RequestContextMiddleware, service_name=SERVICE)
    instrument_app(app)
    return app


def _own_document(app: FastAPI) -> dict:
    return get_openapi(title=app.title, version=app.version, routes=app.routes)
