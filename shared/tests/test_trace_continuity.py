"""One trace from an HTTP request, through the event log and the relay's publish, into the
consumer's `process` span and the database write its handler makes — asserted on the
spans actually exported."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import APIRouter
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import text

from shared.api import SessionmakerDep, create_app
from shared.events import DomainEvent
from shared.inbox import Consumer
from shared.relay import Relay
from shared.settings import KitSettings
from shared.telemetry import instrument_app, instrument_engine, setup_telemetry
from shared.testing import bearer
from shared.tests.conftest import eventually
from shared.uow import run_in_transaction

exporter = InMemorySpanExporter()


def counter_app(kit, public_key: str):
    router = APIRouter()

    @router.post("/v1/counters/{counter_id}", status_code=201)
    async def bump(counter_id: str, sessionmaker: SessionmakerDep) -> dict:
        async def use_case(uow):
            await uow.session.execute(text("INSERT INTO counters (id, value) VALUES (:id, 1)"), {"id": counter_id})
            uow.add(DomainEvent("counter.incremented.v1", "counter", counter_id, {"by": 1}))

        await run_in_transaction(sessionmaker, use_case)
        return {"id": counter_id}

    settings = KitSettings(service_name=kit.service, database_url=kit.db.app_url,
                           INTERNAL_TOKEN_PUBLIC_KEY=public_key)
    app = create_app(service_name=kit.service, settings=settings, routers=[router], engine=kit.engine)
    instrument_app(app)
    return app


async def mirror(uow, event) -> None:
    await uow.session.execute(text("INSERT INTO counters (id, value) VALUES (:id, 1)"),
                              {"id": f"mirror:{event.subject}"})


async def test_trace_runs_from_http_through_relay_and_consumer_into_its_db_write(kit, platform, internal_keys):
    setup_telemetry("kit-test", role="test", extra_processor=SimpleSpanProcessor(exporter))
    instrument_engine(kit.engine)
    private_pem, public_pem = internal_keys
    app = counter_app(kit, public_pem)
    stop = asyncio.Event()
    relay = Relay(service=kit.service, database_url=kit.db.app_url, bootstrap=platform.bootstrap, poll_interval_s=0.2)
    consumer = Consumer(name=f"{kit.service}-mirror", service=kit.service, topics=[kit.topic],
                        handlers={"counter.incremented.v1": mirror}, sessionmaker=kit.sessionmaker,
                        bootstrap=platform.bootstrap)
    tasks = [asyncio.create_task(relay.run(stop)), asyncio.create_task(consumer.run(stop))]
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
            response = await client.post("/v1/counters/traced",
                                         headers=bearer(private_pem, tenant_id="t1", principal="p1", scopes=[]))
        assert response.status_code == 201, response.text
        await eventually(lambda: kit.value("mirror:traced"), timeout=30)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)

    spans = {s.context.span_id: s for s in exporter.get_finished_spans()}
    server = next(s for s in spans.values() if s.kind == SpanKind.SERVER and "/v1/counters" in s.name)
    in_trace = [s for s in spans.values() if s.context.trace_id == server.context.trace_id]
    write = next(s for s in in_trace if s.kind == SpanKind.CLIENT and s.name.startswith("INSERT")
                 and _ancestor(spans, s, SpanKind.CONSUMER))

    chain = _chain(spans, write)
    kinds = [s.kind for s in chain]
    # db write ◀ consumer process ◀ relay publish ◀ ... ◀ HTTP server span
    assert kinds[1] == SpanKind.CONSUMER and chain[1].name == f"{kit.topic} process"
    assert SpanKind.PRODUCER in kinds and chain[kinds.index(SpanKind.PRODUCER)].name == f"{kit.topic} publish"
    assert server in chain
    assert {s.context.trace_id for s in chain} == {server.context.trace_id}


def _chain(spans, span):
    chain = [span]
    while chain[-1].parent is not None and chain[-1].parent.span_id in spans:
        chain.append(spans[chain[-1].parent.span_id])
    return chain


def _ancestor(spans, span, kind):
    return any(s.kind == kind for s in _chain(spans, span)[1:])
