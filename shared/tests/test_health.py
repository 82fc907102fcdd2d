"""Readiness on every process: an API's `/readyz` and a relay's or consumer's health server
check the database, the schema's migrations and the broker, and name what failed. The
broker is required by the relay and consumer; an API only reports it (its outbox keeps
writes safe while the broker is away)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from clearhouse.embedded import free_port
from shared.api import create_app
from shared.db import make_engine, make_sessionmaker
from shared.errors import PROBLEM_MEDIA_TYPE
from shared.health import WorkerHealth, standard_checks
from shared.metrics import serve_metrics
from shared.settings import KitSettings
from shared.testing import eventually
from shared.tests.kit_app import KIT_MIGRATIONS, PUBLIC_PEM, client, kit_database

SERVICE = "healthtest"


@pytest.fixture(scope="module")
async def database(platform):
    async with kit_database(platform, prefix="health") as parts:
        yield parts


def api(database, bootstrap: str):
    db, engine, sessionmaker = database
    settings = KitSettings(service_name=SERVICE, database_url=db.app_url, internal_token_public_key=PUBLIC_PEM)
    return create_app(service_name=SERVICE, settings=settings, routers=[], engine=engine, sessionmaker=sessionmaker,
                      migrations_dir=KIT_MIGRATIONS, broker_bootstrap=bootstrap)


async def test_api_is_ready_when_database_schema_and_broker_answer(database, platform):
    async with client(api(database, platform.bootstrap)) as http:
        response = await http.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "migrations": "ok", "broker": "ok"}}


async def test_api_with_the_broker_down_stays_ready_and_says_it_is_degraded(database):
    """The outbox keeps an API's writes safe while the broker is away: it stays in
    rotation and says which check failed."""
    closed = f"127.0.0.1:{free_port()}"
    async with client(api(database, closed)) as http:
        response = await http.get("/readyz")
    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == "degraded"
    assert answer["checks"]["database"] == answer["checks"]["migrations"] == "ok"
    assert answer["checks"]["broker"] == "The Kafka broker is not reachable."
    assert closed not in response.text  # reasons name the check, never an address


async def test_api_with_the_database_down_is_not_ready_and_says_so(platform):
    engine = make_engine(f"postgresql://nobody@127.0.0.1:{free_port()}/nothing", pool_size=1)
    settings = KitSettings(service_name=SERVICE, database_url="postgresql://nobody@127.0.0.1:1/nothing",
                           internal_token_public_key=PUBLIC_PEM)
    app = create_app(service_name=SERVICE, settings=settings, routers=[], engine=engine,
                     sessionmaker=make_sessionmaker(engine), migrations_dir=KIT_MIGRATIONS,
                     broker_bootstrap=platform.bootstrap)
    try:
        async with client(app) as http:
            response = await http.get("/readyz")
    finally:
        await engine.dispose()
    assert response.status_code == 503
    assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
    problem = response.json()
    assert problem["code"] == "not_ready" and problem["checks"]["broker"] == "ok"
    assert problem["checks"]["database"] != "ok" and "database" in problem["detail"]


async def worker_answers(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(f"http://127.0.0.1:{port}{path}")


async def test_worker_health_server_answers_probes_and_metrics(database, platform):
    _, engine, _ = database
    port = free_port()
    health = WorkerHealth(standard_checks(engine=engine, migrations_dir=KIT_MIGRATIONS, bootstrap=platform.bootstrap),
                          interval_s=0.2)
    serve_metrics(port, health=health)
    stop = asyncio.Event()
    monitor = asyncio.create_task(health.monitor(stop))
    try:
        ready = await eventually(lambda: _status_is(port, "/readyz", 200), timeout=30)
        alive = await worker_answers(port, "/healthz")
        scraped = await worker_answers(port, "/metrics")
    finally:
        stop.set()
        await monitor
    assert ready.json()["checks"] == {"database": "ok", "migrations": "ok", "broker": "ok"}
    assert alive.status_code == 200 and alive.json() == {"status": "ok"}
    assert scraped.status_code == 200 and "clearhouse_http_requests_total" in scraped.text


async def test_worker_with_the_broker_down_is_not_ready_but_alive(database):
    _, engine, _ = database
    port = free_port()
    health = WorkerHealth(standard_checks(engine=engine, migrations_dir=KIT_MIGRATIONS,
                                          bootstrap=f"127.0.0.1:{free_port()}"), interval_s=0.2)
    serve_metrics(port, health=health)
    before = await worker_answers(port, "/readyz")  # no checks have run yet: not ready either
    stop = asyncio.Event()
    monitor = asyncio.create_task(health.monitor(stop))
    try:
        problem = (await eventually(lambda: _has_checks(port), timeout=30)).json()
        alive = await worker_answers(port, "/healthz")
    finally:
        stop.set()
        await monitor
    assert before.status_code == 503 and before.json()["code"] == "not_ready"
    assert problem["code"] == "not_ready" and problem["checks"]["broker"] != "ok"
    assert problem["checks"]["database"] == "ok" and "broker" in problem["detail"]
    assert alive.status_code == 200


def test_a_worker_whose_loop_stopped_turning_fails_liveness():
    health = WorkerHealth({}, stale_after_s=30)
    assert health.answer("/healthz")[0] == 200
    health._heartbeat -= 60  # the loop last turned a minute ago
    status, content_type, body = health.answer("/healthz")
    assert status == 503 and content_type == PROBLEM_MEDIA_TYPE and b"not_ready" in body
    assert health.answer("/metrics") is None  # everything else is the exposition's


async def _status_is(port: int, path: str, status: int) -> httpx.Response | None:
    response = await worker_answers(port, path)
    return response if response.status_code == status else None


async def _has_checks(port: int) -> httpx.Response | None:
    response = await worker_answers(port, "/readyz")
    return response if response.json().get("checks") else None
