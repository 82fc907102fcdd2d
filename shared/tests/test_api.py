"""`create_app` gives every service the same edges: ids, limits, errors, health, metrics."""

from __future__ import annotations

import logging
import re
import shutil

import pytest
from fastapi import APIRouter, Request
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY
from pydantic import BaseModel

from shared import context
from shared.api import create_app
from shared.db import make_engine
from shared.events import DomainEvent
from shared.settings import KitSettings
from shared.tests.kit_app import KIT_MIGRATIONS, PUBLIC_PEM, bearer, client, kit_database
from shared.uow import run_in_transaction

SERVICE = "apitest"


class Note(BaseModel):
    text: str


def routers() -> tuple[APIRouter, APIRouter]:
    private, public = APIRouter(), APIRouter()

    @private.get("/items/{item_id}")
    async def get_item(item_id: str, request: Request) -> dict:
        ctx = context.current()
        return {"item_id": item_id, "request_id": ctx.request_id, "correlation_id": ctx.correlation_id,
                "tenant": ctx.tenant_id}

    @private.post("/notes", status_code=201)
    async def post_note(note: Note) -> dict:
        return {"length": len(note.text)}

    @private.get("/crash")
    async def crash() -> dict:
        raise RuntimeError("connection to 10.0.0.7 failed: password authentication failed for user ledger")

    @public.post("/webhooks/processor")
    async def webhook() -> dict:
        return {"accepted": True}

    @public.post("/webhooks/raw")
    async def raw_webhook(request: Request) -> dict:  # reads its body itself, as signed webhooks do
        return {"bytes": len(await request.body())}

    return private, public


def settings(url: str) -> KitSettings:
    return KitSettings(service_name=SERVICE, database_url=url, internal_token_public_key=PUBLIC_PEM)


@pytest.fixture(scope="module")
async def database(platform):
    async with kit_database(platform, prefix="api") as parts:
        yield parts


@pytest.fixture(scope="module")
def app(database):
    db, engine, sessionmaker = database
    private, public = routers()
    return create_app(service_name=SERVICE, settings=settings(db.app_url), routers=[private],
                      public_routers=[public], engine=engine, sessionmaker=sessionmaker,
                      migrations_dir=KIT_MIGRATIONS, max_body_bytes=1024)


async def test_routers_require_an_internal_token_public_routers_do_not(app):
    async with client(app) as http:
        refused = await http.get("/items/1")
        allowed = await http.get("/items/1", headers=bearer(tenant="t9"))
        webhook = await http.post("/webhooks/processor")
    assert refused.status_code == 401 and refused.json()["code"] == "invalid_internal_token"
    assert allowed.status_code == 200 and allowed.json()["tenant"] == "t9"
    assert webhook.status_code == 200
    assert app.state.internal_token_public_key == PUBLIC_PEM


async def test_request_and_correlation_ids_are_bound_and_echoed(app):
    async with client(app) as http:
        given = await http.get("/items/1", headers={**bearer(), "Request-Id": "req-abc", "X-Correlation-Id": "corr-1"})
        legacy = await http.get("/items/1", headers={**bearer(), "X-Request-Id": "req-legacy"})
        fresh = await http.get("/items/1", headers=bearer())
        hostile = await http.get("/items/1", headers={**bearer(), "Request-Id": "x" * 200, "X-Correlation-Id": "a b"})
    assert given.headers["request-id"] == "req-abc" and given.headers["x-correlation-id"] == "corr-1"
    assert given.json()["request_id"] == "req-abc" and given.json()["correlation_id"] == "corr-1"
    assert legacy.headers["request-id"] == "req-legacy"
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["request-id"])
    assert fresh.headers["x-correlation-id"] == fresh.headers["request-id"]  # a new chain starts here
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["request-id"])
    assert context.current().request_id is None  # nothing leaks out of a request


async def test_problems_carry_the_request_id_too(app):
    async with client(app) as http:
        response = await http.get("/nowhere", headers={"Request-Id": "req-404"})
    assert response.status_code == 404 and response.headers["request-id"] == "req-404"
    assert response.json()["trace_id"] == "req-404"


async def test_an_unexpected_error_is_a_500_problem_that_leaks_nothing(app, caplog):
    caplog.set_level(logging.ERROR, logger="shared.errors")
    async with client(app) as http:  # raises in the test if anything escaped the middleware
        response = await http.get("/crash", headers={**bearer(), "Request-Id": "req-crash"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["request-id"] == "req-crash"
    body = response.json()
    assert body["code"] == "internal_error" and body["trace_id"] == "req-crash"
    assert "10.0.0.7" not in response.text and "password" not in response.text
    logged = [r for r in caplog.records if r.name == "shared.errors"]
    assert len(logged) == 1 and "req-crash" in logged[0].getMessage() and logged[0].exc_info


async def test_bodies_over_the_limit_are_refused_by_declared_length(app):
    async with client(app) as http:
        response = await http.post("/notes", headers={**bearer(), "content-type": "application/json"},
                                   content=b'{"text": "' + b"x" * 2000 + b'"}')
        fine = await http.post("/notes", headers=bearer(), json={"text": "x" * 500})
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"
    assert response.headers["request-id"]
    assert fine.status_code == 201


async def test_bodies_over_the_limit_are_refused_while_streaming(app):
    async def chunks():
        yield b'{"text": "'
        for _ in range(10):
            yield b"x" * 200
        yield b'"}'

    async with client(app) as http:  # no Content-Length: chunked transfer
        response = await http.post("/notes", headers={**bearer(), "content-type": "application/json"},
                                   content=chunks())
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


async def test_a_client_that_hangs_up_before_its_body_is_counted_not_logged_as_our_error(app, caplog):
    """A sender that gives up (its timeout) before its body arrived: no answer is owed,
    no 500 is logged or counted; the request shows as 499, client closed request."""
    def count(status: str) -> float:
        return REGISTRY.get_sample_value("clearhouse_http_requests_total", {
            "service": SERVICE, "method": "POST", "route": "/webhooks/raw", "status": status}) or 0.0

    before = count("499")
    sent: list = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    headers = [(k.lower().encode(), v.encode()) for k, v in {**bearer(), "content-type": "application/json",
                                                              "content-length": "20"}.items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/webhooks/raw", "raw_path": b"/webhooks/raw", "query_string": b"", "headers": headers, "scheme": "http",
             "server": ("test", 80), "client": ("127.0.0.1", 5000), "root_path": ""}
    with caplog.at_level(logging.INFO):
        await app(scope, receive, send)
    assert count("499") == before + 1 and count("500") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not any(m["type"] == "http.response.start" and m["status"] >= 500 for m in sent)


async def test_healthz_and_readyz_at_head(app):
    async with client(app) as http:
        health = await http.get("/healthz")
        ready = await http.get("/readyz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "migrations": "ok"}}


async def test_readyz_is_503_when_migrations_are_behind(database, tmp_path):
    db, engine, sessionmaker = database
    newer = tmp_path / "migrations"
    shutil.copytree(KIT_MIGRATIONS, newer, ignore=shutil.ignore_patterns("__pycache__"))
    (newer / "versions" / "0002_next.py").write_text(
        'revision = "0002"\ndown_revision = "0001"\n\n\ndef upgrade() -> None:\n    pass\n')
    app = create_app(service_name=SERVICE, settings=settings(db.app_url), routers=[], engine=engine,
                     sessionmaker=sessionmaker, migrations_dir=newer)
    async with client(app) as http:
        response = await http.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["code"] == "not_ready" and "0001" in body["detail"] and "0002" in body["detail"]


async def test_readyz_is_503_when_the_database_is_unreachable(caplog):
    engine = make_engine("postgresql://nobody:secret@127.0.0.1:1/nowhere", pool_size=1)
    app = create_app(service_name=SERVICE, settings=settings("postgresql://127.0.0.1:1/x"), routers=[],
                     engine=engine, migrations_dir=KIT_MIGRATIONS)
    try:
        async with client(app) as http:
            response = await http.get("/readyz")
            metrics = await http.get("/metrics")  # still answers, with every other metric
    finally:
        await engine.dispose()
    assert response.status_code == 503
    assert response.json()["code"] == "not_ready" and "secret" not in response.text
    assert metrics.status_code == 200


async def test_metrics_report_outbox_backlog_and_requests_by_route_template(app, database):
    _, _, sessionmaker = database

    async def record_two_events(uow):
        for n in range(2):
            uow.add(DomainEvent("note.written.v1", "note", f"n{n}", {"n": n}, tenant_id="t1", actor="user:test"))

    await run_in_transaction(sessionmaker, record_two_events)
    async with client(app) as http:
        for item in ("a1", "b2", "c3"):
            await http.get(f"/items/{item}", headers=bearer())
        response = await http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert REGISTRY.get_sample_value("clearhouse_outbox_backlog", {"service": SERVICE}) == 2
    assert REGISTRY.get_sample_value("clearhouse_outbox_oldest_unpublished_age_seconds", {"service": SERVICE}) > 0
    labels = {"service": SERVICE, "method": "GET", "route": "/items/{item_id}", "status": "200"}
    assert REGISTRY.get_sample_value("clearhouse_http_requests_total", labels) >= 3
    assert 'route="/items/a1"' not in response.text
    assert f'clearhouse_outbox_backlog{{service="{SERVICE}"}} 2.0' in response.text


async def test_lifespan_disposes_the_engine(platform):
    async with kit_database(platform, prefix="apil") as (db, engine, sessionmaker):
        app = create_app(service_name=SERVICE, settings=settings(db.app_url), routers=[], engine=engine)
        async with app.router.lifespan_context(app):
            async with engine.connect():
                pass
            assert engine.pool.checkedin() == 1
        assert engine.pool.checkedin() == 0


def test_the_default_engine_comes_from_settings():
    app = create_app(service_name=SERVICE, settings=settings("postgresql://u@db.internal:5432/ledger"), routers=[])
    assert app.state.engine.url.host == "db.internal"
    assert app.state.sessionmaker.kw["bind"] is app.state.engine


async def test_with_tracing_a_problem_quotes_the_trace_id(database):
    db, engine, sessionmaker = database
    app = create_app(service_name=SERVICE, settings=settings(db.app_url), routers=[], engine=engine,
                     sessionmaker=sessionmaker)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=TracerProvider())
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with client(app) as http:
        response = await http.get("/nowhere", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert response.status_code == 404
    assert response.json()["trace_id"] == trace_id
