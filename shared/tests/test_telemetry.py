"""Telemetry as an operator meets it: span files `clearhouse trace` can read, one trace
across a Kafka hop, JSON log lines joined to traces, and no sensitive value in either.

Pure in-process: real SDK providers and exporters, a real SQLite engine, a real FastAPI
app and a real local HTTP server; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import logging
import logging.config
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import sqlalchemy
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from clearhouse.traceview import find_trace, load_spans, render_waterfall, trace_ids_for_attribute
from shared import context
from shared.telemetry import (
    build_resource,
    build_tracer_provider,
    context_from_traceparent,
    exporter_names,
    force_flush,
    instrument_app,
    instrument_engine,
    instrument_httpx,
    kafka_span,
    setup_logging,
    setup_telemetry,
    traceparent_of_current_span,
    uvicorn_log_config,
)

IBAN = "DE89370400440532013000"
MASKED_IBAN = "DE89********3000"
OTEL_VARIABLES = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST",
    "CLEARHOUSE_TRACES_DIR",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def memory_exporter():
    """The process-wide provider, with an in-memory exporter attached for assertions."""
    exporter = InMemorySpanExporter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_TRACES_EXPORTER", "none")  # if this module sets it up, write no files
        setup_telemetry("telemetry-test", role="test", extra_processor=SimpleSpanProcessor(exporter))
    yield exporter
    exporter.clear()


@pytest.fixture
def finished(memory_exporter):
    memory_exporter.clear()
    return memory_exporter


def all_attribute_values(spans) -> str:
    values = []
    for span in spans:
        values += [str(v) for v in (span.attributes or {}).values()]
        values += [str(v) for e in span.events for v in (e.attributes or {}).values()]
        values.append(span.status.description or "")
    return "\n".join(values)


# --- the file exporter and traceview --------------------------------------------------------


def test_file_exporter_writes_otlp_json_that_traceview_reads_back_as_one_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARHOUSE_TRACES_DIR", str(tmp_path))
    api = build_tracer_provider("payments", role="api")
    consumer = build_tracer_provider("ledger", role="consumer")
    tracer = api.get_tracer("test")

    # payments API: request -> SQL -> publish; ledger consumer: process -> failing SQL.
    with tracer.start_as_current_span("POST /v1/payments", kind=SpanKind.SERVER) as request:
        request.set_attribute("clearhouse.payment_id", "pay_123")
        with tracer.start_as_current_span("INSERT payments", kind=SpanKind.CLIENT):
            pass
        with kafka_span("publish payments.events", kind=SpanKind.PRODUCER, topic="payments.events",
                        message_id="evt-1", tracer_provider=api):
            header = traceparent_of_current_span()
    with kafka_span("process payments.events", kind=SpanKind.CONSUMER, parent_traceparent=header,
                    topic="payments.events", message_id="evt-1", tracer_provider=consumer):
        with consumer.get_tracer("test").start_as_current_span("INSERT holds", kind=SpanKind.CLIENT) as insert:
            insert.set_status(Status(StatusCode.ERROR, "insufficient_funds"))
    for provider in (api, consumer):
        assert provider.force_flush(5_000)
        provider.shutdown()

    files = sorted(p.name for p in tmp_path.iterdir())
    assert [re.sub(r"-\d+\.jsonl$", "", f) for f in files] == ["ledger-consumer", "payments-api"]
    for path in tmp_path.iterdir():
        for line in path.read_text().splitlines():
            assert_otlp_json(json.loads(line))

    spans = load_spans(tmp_path)
    trace_id = request.get_span_context().trace_id
    trace_spans = find_trace(spans, f"{trace_id:032x}")
    by_name = {s.name: s for s in trace_spans}
    assert set(by_name) == {"POST /v1/payments", "INSERT payments", "publish payments.events",
                            "process payments.events", "INSERT holds"}
    root = by_name["POST /v1/payments"]
    assert root.parent_span_id is None and root.service == "clearhouse-payments" and root.role == "api"
    assert by_name["INSERT payments"].parent_span_id == root.span_id
    assert by_name["publish payments.events"].parent_span_id == root.span_id
    assert by_name["process payments.events"].parent_span_id == by_name["publish payments.events"].span_id
    assert by_name["process payments.events"].service == "clearhouse-ledger"
    assert by_name["INSERT holds"].parent_span_id == by_name["process payments.events"].span_id
    assert by_name["INSERT holds"].is_error
    assert by_name["publish payments.events"].attributes["messaging.destination.name"] == "payments.events"
    assert trace_ids_for_attribute(spans, "clearhouse.payment_id", "pay_123") == [f"{trace_id:032x}"]

    lines = render_waterfall(trace_spans).splitlines()
    assert lines[0].startswith(f"trace {trace_id:032x} · 5 spans · payments, ledger")
    body = lines[1:]
    assert [re.match(r"(.*?\S)\s{2,}", line).group(1) for line in body] == [
        "POST /v1/payments",
        "├─ INSERT payments",
        "└─ [→kafka] publish payments.events",
        "   └─ [kafka→] process payments.events",
        "      └─ INSERT holds",
    ]
    assert "ledger/consumer" in body[3] and body[4].endswith("✗ ERROR insufficient_funds")


def assert_otlp_json(document: dict) -> None:
    """The shape the OTLP/JSON spec and the collector's file exporter use."""
    (resource_spans,) = document["resourceSpans"]
    resource = {a["key"]: a["value"] for a in resource_spans["resource"]["attributes"]}
    assert resource["service.namespace"] == {"stringValue": "clearhouse"}
    assert "intValue" in resource["process.pid"] and isinstance(resource["process.pid"]["intValue"], str)
    for scope_spans in resource_spans["scopeSpans"]:
        assert "name" in scope_spans["scope"]
        for span in scope_spans["spans"]:
            assert re.fullmatch(r"[0-9a-f]{32}", span["traceId"])
            assert re.fullmatch(r"[0-9a-f]{16}", span["spanId"])
            assert re.fullmatch(r"[0-9a-f]{16}", span.get("parentSpanId", "0" * 16))
            assert isinstance(span["kind"], int)
            assert span["startTimeUnixNano"].isdigit() and span["endTimeUnixNano"].isdigit()
            for attribute in span.get("attributes", []):
                assert set(attribute) == {"key", "value"} and len(attribute["value"]) == 1


def test_spans_written_to_file_carry_no_parameters_bodies_or_personal_data(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARHOUSE_TRACES_DIR", str(tmp_path))
    provider = build_tracer_provider("payments")
    with provider.get_tracer("test").start_as_current_span("careless instrumentation") as span:
        span.set_attribute("db.statement", "SELECT * FROM payees WHERE iban = $1")
        span.set_attribute("db.statement.parameters", f"('{IBAN}',)")
        span.set_attribute("http.request.body", '{"payee": {"name": "Jane Doe"}}')
        span.set_attribute("clearhouse.payee.name", "Jane Doe")
        span.set_attribute("http.request.header.authorization", ("Bearer sk_live_123",))
        span.set_attribute("note", f"paying {IBAN}")
        span.record_exception(ValueError(f"[SQL: INSERT ...]\n[parameters: ('{IBAN}', 'Jane Doe')]"))
        span.set_status(Status(StatusCode.ERROR, f"rejected {IBAN}"))
    provider.force_flush(5_000)
    provider.shutdown()

    written = "".join(p.read_text() for p in tmp_path.iterdir())
    for secret in (IBAN, "Jane Doe", "sk_live_123", "db.statement.parameters", "http.request.body"):
        assert secret not in written
    (span,) = load_spans(tmp_path)
    assert span.attributes["db.statement"] == "SELECT * FROM payees WHERE iban = $1"
    assert span.attributes["clearhouse.payee.name"] == "J*** D**"
    assert span.attributes["note"] == f"paying {MASKED_IBAN}"
    assert span.status_message == f"rejected {MASKED_IBAN}"


def test_exporter_none_exports_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default file exporter would write
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    provider = build_tracer_provider("payments")
    with provider.get_tracer("test").start_as_current_span("work"):
        pass
    assert provider.force_flush(5_000)
    provider.shutdown()
    assert list(tmp_path.rglob("*")) == []


def test_the_sampler_follows_otel_traces_sampler(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARHOUSE_TRACES_DIR", str(tmp_path))
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    provider = build_tracer_provider("payments")
    with provider.get_tracer("test").start_as_current_span("unsampled") as span:
        assert not span.is_recording()
    provider.force_flush(5_000)
    provider.shutdown()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, ["file"]),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "jaegr"}, ["file"]),
    ],
)
def test_exporters_follow_the_standard_variables(monkeypatch, variables, expected):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert exporter_names() == expected


def test_partially_written_last_line_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARHOUSE_TRACES_DIR", str(tmp_path))
    provider = build_tracer_provider("payments")
    with provider.get_tracer("test").start_as_current_span("complete"):
        pass
    provider.force_flush(5_000)
    provider.shutdown()
    (path,) = tmp_path.iterdir()
    whole = path.read_text()
    path.write_text(whole + whole[: len(whole) // 2])  # a batch caught mid-write
    assert [s.name for s in load_spans(tmp_path)] == ["complete"]


def test_resource_names_the_service_role_and_instance(monkeypatch):
    attributes = build_resource("ledger", role="relay").attributes
    assert attributes["service.name"] == "clearhouse-ledger"
    assert attributes["service.namespace"] == "clearhouse"
    assert attributes["clearhouse.role"] == "relay"
    assert attributes["service.instance.id"] != build_resource("ledger", role="relay").attributes["service.instance.id"]
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ledger-canary")
    assert build_resource("ledger").attributes["service.name"] == "ledger-canary"


def test_setup_telemetry_is_idempotent(memory_exporter):
    first = trace.get_tracer_provider()
    again = setup_telemetry("telemetry-test", role="test")
    assert again is first
    assert force_flush()


# --- one trace across a Kafka hop ---------------------------------------------------------


def test_consumer_span_continues_the_producer_trace_through_a_traceparent_string(finished):
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("relay batch"):
        with kafka_span("publish payments.events", kind=SpanKind.PRODUCER, topic="payments.events",
                        message_id="evt-9") as producer:
            header = traceparent_of_current_span()
    version, trace_id, parent_id, flags = header.split("-")
    assert (version, trace_id, parent_id) == (
        "00", f"{producer.get_span_context().trace_id:032x}", f"{producer.get_span_context().span_id:016x}"
    )
    assert int(flags, 16) & 0x01  # sampled

    # The consumer runs elsewhere: nothing is current but the header's text.
    assert not trace.get_current_span().get_span_context().is_valid
    with kafka_span("process payments.events", kind=SpanKind.CONSUMER, parent_traceparent=header,
                    topic="payments.events", message_id="evt-9",
                    attributes={"messaging.consumer.group.name": "ledger"}) as consumer:
        with tracer.start_as_current_span("handler work") as work:
            pass

    assert consumer.get_span_context().trace_id == producer.get_span_context().trace_id
    assert consumer.parent.span_id == producer.get_span_context().span_id and consumer.parent.is_remote
    assert work.parent.span_id == consumer.get_span_context().span_id
    spans = {s.name: s for s in finished.get_finished_spans()}
    assert spans["publish payments.events"].kind is SpanKind.PRODUCER
    assert dict(spans["publish payments.events"].attributes) == {
        "messaging.system": "kafka", "messaging.operation": "publish", "messaging.operation.type": "send",
        "messaging.destination.name": "payments.events", "messaging.message.id": "evt-9",
    }
    assert spans["process payments.events"].kind is SpanKind.CONSUMER
    assert spans["process payments.events"].attributes["messaging.operation"] == "process"
    assert spans["process payments.events"].attributes["messaging.consumer.group.name"] == "ledger"


def test_missing_or_malformed_traceparent_starts_from_the_current_context(finished):
    assert not trace.get_current_span(context_from_traceparent(None)).get_span_context().is_valid
    assert not trace.get_current_span(context_from_traceparent("00-garbage")).get_span_context().is_valid
    with trace.get_tracer("test").start_as_current_span("consumer loop") as loop:
        with kafka_span("process x", kind=SpanKind.CONSUMER, parent_traceparent="00-garbage") as span:
            pass
    assert span.parent.span_id == loop.get_span_context().span_id


def test_a_failing_handler_marks_its_kafka_span_as_error(finished):
    with pytest.raises(RuntimeError):
        with kafka_span("process x", kind=SpanKind.CONSUMER):
            raise RuntimeError("boom")
    (span,) = finished.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.events[0].attributes["exception.type"] == "RuntimeError"


def test_kafka_span_refuses_other_kinds():
    with pytest.raises(ValueError):
        with kafka_span("x", kind=SpanKind.SERVER):
            pass


# --- instrumentation ----------------------------------------------------------------------


def test_sql_spans_carry_the_statement_but_never_its_parameters(finished):
    engine = sqlalchemy.create_engine("sqlite://")
    instrument_engine(engine)
    instrument_engine(engine)  # twice must not double the spans
    with trace.get_tracer("test").start_as_current_span("use case") as use_case:
        with engine.connect() as connection:
            assert connection.execute(sqlalchemy.text("SELECT :iban AS iban"), {"iban": IBAN}).scalar() == IBAN
    statements = [s for s in finished.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert len(statements) == 1
    (statement,) = statements
    assert statement.parent.span_id == use_case.get_span_context().span_id
    assert "SELECT ? AS iban" in all_attribute_values(statements)
    assert IBAN not in all_attribute_values(finished.get_finished_spans())


async def test_request_spans_skip_probes_and_never_carry_bodies_or_credentials(finished, monkeypatch):
    # Even when an operator asks for request headers, credentials are not recorded.
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "authorization,x-request-id")
    app = FastAPI()

    @app.post("/v1/payments")
    async def create_payment(body: dict) -> dict:
        return {"id": "pay_1"}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    instrument_app(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://payments") as client:
        assert (await client.get("/healthz")).status_code == 200
        response = await client.post(
            "/v1/payments",
            json={"payee": {"name": "Jane Doe", "iban": IBAN}},
            headers={"Authorization": "Bearer sk_live_123", "X-Request-Id": "req-1"},
        )
        assert response.status_code == 200

    spans = finished.get_finished_spans()
    assert [s.name for s in spans] == ["POST /v1/payments"]
    (request,) = spans
    assert request.kind is SpanKind.SERVER
    assert request.attributes["http.request.header.authorization"] == ("[REDACTED]",)
    assert request.attributes["http.request.header.x_request_id"] == ("req-1",)
    recorded = all_attribute_values(spans)
    assert IBAN not in recorded and "Jane Doe" not in recorded and "sk_live_123" not in recorded


class _RecordingHandler(BaseHTTPRequestHandler):
    received: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.received.append(self.headers.get("traceparent"))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        """Quiet: the test reads what the server received, not its log."""


def test_outgoing_httpx_calls_are_spans_and_carry_the_trace(finished):
    instrument_httpx()
    instrument_httpx()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with trace.get_tracer("test").start_as_current_span("gateway route") as route:
            assert httpx.get(f"http://127.0.0.1:{server.server_port}/v1/ledger/accounts").status_code == 204
    finally:
        server.shutdown()
        server.server_close()
    (client,) = [s for s in finished.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert client.parent.span_id == route.get_span_context().span_id
    (header,) = _RecordingHandler.received
    assert header.split("-")[1:3] == [f"{client.context.trace_id:032x}", f"{client.context.span_id:016x}"]


# --- JSON logs ----------------------------------------------------------------------------


@pytest.fixture
def log_stream():
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    setup_logging("payments", level="DEBUG", role="consumer", stream=stream)
    yield stream
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def lines_of(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_log_line_is_json_with_trace_and_request_context(log_stream, memory_exporter):
    token = context.bind(correlation_id="corr-1", request_id="req-1", tenant_id="acme", principal="svc-batch")
    try:
        with trace.get_tracer("test").start_as_current_span("handler") as span:
            logging.getLogger("payments.service").info("payment %s submitted", "pay_1", extra={"attempt": 2})
    finally:
        context.reset(token)

    (line,) = lines_of(log_stream)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    assert line | {"ts": None} == {
        "ts": None,
        "level": "INFO",
        "logger": "payments.service",
        "message": "payment pay_1 submitted",
        "service": "payments",
        "role": "consumer",
        "trace_id": f"{span.get_span_context().trace_id:032x}",
        "span_id": f"{span.get_span_context().span_id:016x}",
        "correlation_id": "corr-1",
        "request_id": "req-1",
        "tenant_id": "acme",
        "principal": "svc-batch",
        "attempt": 2,
    }


def test_log_line_masks_sensitive_extra_fields_and_free_text(log_stream):
    logging.getLogger("payments").warning(
        "payee %s rejected",
        IBAN,
        extra={
            "iban": IBAN,
            "payee": {"name": "Jane Doe", "iban": IBAN},
            "account_number": "0532013000",
            "api_key": "sk_live_123",
            "headers": {"Authorization": "Bearer sk_live_123"},
        },
    )
    raw = log_stream.getvalue()
    assert IBAN not in raw and "Jane Doe" not in raw and "sk_live_123" not in raw and "0532013000" not in raw
    (line,) = lines_of(log_stream)
    assert line["message"] == f"payee {MASKED_IBAN} rejected"
    assert line["iban"] == MASKED_IBAN
    assert line["payee"] == {"name": "J*** D**", "iban": MASKED_IBAN}
    assert line["account_number"] == "********3000"
    assert line["api_key"] == "[REDACTED]"
    assert line["headers"] == {"Authorization": "[REDACTED]"}


def test_exceptions_are_fields_and_their_text_is_scrubbed(log_stream):
    try:
        raise ValueError(f"bad payee iban {IBAN}")
    except ValueError:
        logging.getLogger("payments").exception("could not create payment")
    (line,) = lines_of(log_stream)
    assert line["level"] == "ERROR" and line["exc_type"] == "ValueError"
    assert "Traceback (most recent call last)" in line["exc"] and MASKED_IBAN in line["exc"]
    assert IBAN not in log_stream.getvalue()
    assert "trace_id" not in line  # no span was active


def test_uvicorn_lines_go_through_the_json_formatter_once(capsys, log_stream):
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    try:
        # As `clearhouse serve` does it: no names given, they come from setup_logging.
        logging.config.dictConfig(uvicorn_log_config())
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/v1/payments?api_key=sk_live_123", "1.1", 200
        )
        (line,) = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    finally:
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
    assert (line["service"], line["role"], line["logger"]) == ("payments", "consumer", "uvicorn.access")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v1/payments?api_key=[REDACTED]", 200)
    assert "sk_live_123" not in json.dumps(line)
    assert log_stream.getvalue() == ""  # not also written by the root handler


def test_a_log_call_with_bad_arguments_still_writes_a_line(log_stream):
    logging.getLogger("payments").info("%d payments", "not a number", extra={"blob": object()})
    (line,) = lines_of(log_stream)
    assert "not a number" in line["message"] and line["blob"].startswith("<object")

