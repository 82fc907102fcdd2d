"""One trace from the caller, through the gateway and the service, the event log and the
relay, into a consumer's `process` span, asserted on the spans actually exported."""

from __future__ import annotations

import asyncio
import uuid

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.tests.conftest import bearer, tenant
from shared.db import make_engine, make_sessionmaker
from shared.inbox import Consumer
from shared.kafka import ensure_topics
from shared.relay import Relay
from shared.telemetry import setup_telemetry
from shared.tests.conftest import eventually

exporter = InMemorySpanExporter()


async def test_the_callers_trace_runs_through_gateway_and_service_into_the_consumer(stack, client):
    setup_telemetry("gateway", role="api", extra_processor=SimpleSpanProcessor(exporter))
    key = await stack.key(tenant=tenant(), scopes=["approvals:request"])
    subject = f"payee-{uuid.uuid4().hex[:8]}"
    # The partner's own span: the (instrumented) client sends its traceparent.
    with trace.get_tracer("partner").start_as_current_span("partner request") as partner:
        response = await client.post("/v1/approvals", json={"subject_type": "payee", "subject_id": subject},
                                     headers=bearer(key))
    assert response.status_code == 201, response.text
    approval_id = response.json()["id"]

    # The approvals service's relay publishes the event; a consumer of approvals.events
    # (the kit's inbox consumer, recording into the ledger database) handles it.
    await ensure_topics(stack.platform.bootstrap, ["approvals.events", "approvals.events.dlq"])
    engine = make_engine(stack.databases["ledger"].app_url, pool_size=2)
    seen: list[str] = []

    async def note(uow, event) -> None:
        if event.subject == approval_id or event.payload.get("approval_id") == approval_id:
            seen.append(event.type)

    consumer = Consumer(name=f"gateway-trace-probe-{uuid.uuid4().hex[:6]}", service="ledger",
                        topics=["approvals.events"],
                        handlers={t: note for t in ("approval.requested.v1", "approval.granted.v1")},
                        sessionmaker=make_sessionmaker(engine), bootstrap=stack.platform.bootstrap)
    relay = Relay(service="approvals", database_url=stack.databases["approvals"].app_url,
                  bootstrap=stack.platform.bootstrap, poll_interval_s=0.2)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(stop)), asyncio.create_task(consumer.run(stop))]
    try:
        await eventually(lambda: _seen(seen), timeout=60)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        await engine.dispose()

    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == partner.get_span_context().trace_id]
    exporter.clear()  # the processor stays on the process-wide provider; keep it from hoarding spans
    by_id = {s.context.span_id: s for s in spans}
    gateway = next(s for s in spans if s.kind == SpanKind.SERVER and s.name == "POST /v1/{path:path}")
    assert _descends(by_id, gateway, by_id[partner.get_span_context().span_id])
    assert gateway.attributes["clearhouse.api_key_id"] == key.split("_")[2]
    assert gateway.attributes["clearhouse.request_id"] == response.headers["request-id"]
    upstream_call = next(s for s in spans if s.kind == SpanKind.CLIENT and s.parent
                         and _descends(by_id, s, gateway) and s.attributes.get("http.request.method",
                                                                                 s.attributes.get("http.method")))
    service = next(s for s in spans if s.kind == SpanKind.SERVER and s.parent
                   and s.parent.span_id == upstream_call.context.span_id)
    process = next(s for s in spans if s.kind == SpanKind.CONSUMER and s.name == "approvals.events process")
    publish = next(s for s in spans if s.kind == SpanKind.PRODUCER)
    # partner ◀ gateway ◀ httpx call ◀ approvals server ◀ ... ◀ relay publish ◀ consumer process
    assert _descends(by_id, service, gateway)
    assert _descends(by_id, publish, service) and _descends(by_id, process, publish)


async def _seen(seen: list[str]) -> bool:
    return bool(seen)


def _descends(by_id, span, ancestor) -> bool:
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        if span is ancestor:
            return True
    return False
