"""OpenTelemetry tracing for every Clearhouse process (API, relay, consumer).

    setup_telemetry("payments", role="api")     once per process, at start
    instrument_app(app) / instrument_engine(engine) / instrument_httpx()
    kafka_span(...)                              one span per Kafka hop:

    API request ──▶ DB spans ──▶ event row (traceparent) ──▶ relay: kafka_span(PRODUCER)
        ──▶ Kafka header `traceparent` ──▶ consumer: kafka_span(CONSUMER, parent=header)
        ──▶ handler's DB spans

Exporters follow the standard variables: `OTEL_TRACES_EXPORTER` = `otlp` | `console` |
`none` (or `file`, a Clearhouse name); with nothing set, an OTLP endpoint variable selects
`otlp`, else spans go to OTLP JSON files under `CLEARHOUSE_TRACES_DIR` (default
`.clearhouse/traces`), one line per batch, which `clearhouse trace` reads back. The
embedded platform has no collector, and files need no running process to be useful.

Telemetry must never carry SQL parameter values, request bodies, credentials or
unmasked personal data: the instrumentations are configured not to record them, and
every exporter sits behind `RedactingSpanExporter` as a second line of defence. It must
never break the work it observes: export failures are logged, not raised.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    SERVICE_NAMESPACE,
    SERVICE_VERSION,
    OTELResourceDetector,
    Resource,
)
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind, Status
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared import redaction
from shared.otlp_json import encode_otlp_json
from shared.logs import setup_logging, uvicorn_log_config

__all__ = [
    "ROLE_ATTRIBUTE",
    "OtlpJsonFileExporter",
    "RedactingSpanExporter",
    "build_tracer_provider",
    "context_from_traceparent",
    "encode_otlp_json",
    "exporter_names",
    "force_flush",
    "instrument_app",
    "instrument_engine",
    "instrument_httpx",
    "kafka_span",
    "setup_logging",
    "setup_telemetry",
    "traceparent_of_current_span",
    "uvicorn_log_config",
]

log = logging.getLogger(__name__)

NAMESPACE = "clearhouse"
ROLE_ATTRIBUTE = "clearhouse.role"  # api | relay | consumer | cli: which process of a service
DEFAULT_TRACES_DIR = ".clearhouse/traces"
# Short enough that `clearhouse trace` and tests see a request's spans almost at once;
# OTEL_BSP_SCHEDULE_DELAY still wins when set.
_SCHEDULE_DELAY_MS = 200
# The export thread holds the GIL while it redacts and encodes a batch: the SDK's 512 spans
# at once stalled requests for tens of milliseconds (balance as_of p99 13-16 ms); 64 keeps
# each stall short (p99 6-11 ms over four runs, bench/ledger_as_of.py). OTEL_BSP_MAX_EXPORT_BATCH_SIZE wins.
_MAX_EXPORT_BATCH = 64
_UNTRACED_PATHS = r"^[a-z]+://[^/]+/(healthz|readyz|metrics)/?$"  # probes and scrapes: noise
_SANITIZED_HEADERS = ["authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", ".*token.*"]
# Attribute keys that would carry values rather than shapes: bound SQL parameters
# (`db.statement.parameters`, `db.query.parameter.<n>`) and message/request bodies.
_FORBIDDEN_ATTRIBUTE = re.compile(r"(^|\.)(parameters?|params)(\.|$)|(^|\.)body$|\.body\.(content|text|raw)")

_PROPAGATOR = TraceContextTextMapPropagator()
_setup_lock = threading.Lock()
_provider: TracerProvider | None = None
_provider_identity: tuple[str, str] | None = None
_instrumented_engines: weakref.WeakSet = weakref.WeakSet()


# --- setup -----------------------------------------------------------------------------


def setup_telemetry(
    service_name: str, *, role: str = "api", extra_processor: SpanProcessor | None = None
) -> TracerProvider:
    """Install the process-wide tracer provider; later calls return the same one.

    A later call may still attach `extra_processor` (tests hang an in-memory exporter on
    it), but cannot rename the process: one process is one service and role."""
    global _provider, _provider_identity
    with _setup_lock:
        if _provider is None:
            _provider = build_tracer_provider(service_name, role=role)
            _provider_identity = (service_name, role)
            trace.set_tracer_provider(_provider)
            if trace.get_tracer_provider() is not _provider:
                log.warning("a tracer provider was installed before setup_telemetry; global tracers use that one")
        elif _provider_identity != (service_name, role):
            log.warning(
                "telemetry already set up for %s/%s; keeping it for %s/%s",
                *_provider_identity, service_name, role,
            )
        if extra_processor is not None:
            _provider.add_span_processor(extra_processor)
        return _provider


def force_flush(timeout_millis: int = 5_000) -> bool:
    """Export every finished span now (before a process exits or a test reads files)."""
    return _provider.force_flush(timeout_millis) if _provider is not None else True


def build_tracer_provider(service_name: str, *, role: str = "api") -> TracerProvider:
    """A configured provider that is not installed globally (setup_telemetry installs it).

    The sampler comes from OTEL_TRACES_SAMPLER through the SDK (parentbased_always_on by
    default), so a caller's sampling decision is honoured across every hop."""
    provider = TracerProvider(resource=build_resource(service_name, role=role))
    for name in exporter_names():
        exporter = RedactingSpanExporter(_EXPORTER_FACTORIES[name](service_name, role))
        provider.add_span_processor(BatchSpanProcessor(exporter, **_batch_options()))
    return provider


def build_resource(service_name: str, *, role: str = "api") -> Resource:
    """Clearhouse's resource, overridden by OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES:
    the deployment knows better than the code (e.g. a pod name as instance id)."""
    ours = Resource.create(
        {
            SERVICE_NAME: f"{NAMESPACE}-{service_name}",
            SERVICE_NAMESPACE: NAMESPACE,
            SERVICE_INSTANCE_ID: str(uuid.uuid4()),
            SERVICE_VERSION: _package_version(),
            ROLE_ATTRIBUTE: role,
            "process.pid": os.getpid(),
        }
    )
    return ours.merge(OTELResourceDetector().detect())


def exporter_names() -> list[str]:
    """Which exporters OTEL_TRACES_EXPORTER asks for (comma-separated, as the spec allows)."""
    requested = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not requested:
        return ["otlp"] if _otlp_endpoint_configured() else ["file"]
    known = [n for n in requested if n in _EXPORTER_FACTORIES]
    unknown = [n for n in requested if n not in _EXPORTER_FACTORIES and n != "none"]
    if unknown:
        log.warning("unsupported OTEL_TRACES_EXPORTER value(s) %s; supported: otlp, console, file, none", unknown)
        if not known:
            return ["file"]  # a typo should not silently lose every trace
    return known


def _otlp_endpoint_configured() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _batch_options() -> dict[str, Any]:
    options: dict[str, Any] = {}
    if not os.environ.get("OTEL_BSP_SCHEDULE_DELAY"):
        options["schedule_delay_millis"] = _SCHEDULE_DELAY_MS
    if not os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"):
        options["max_export_batch_size"] = _MAX_EXPORT_BATCH
    return options


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clearhouse")
    except PackageNotFoundError:
        return "0+unknown"


def _otlp_exporter(_service_name: str, _role: str) -> SpanExporter:
    # Imported here: only processes that export OTLP pay for the HTTP client stack.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not installed; exporting with http/protobuf", protocol)
    return OTLPSpanExporter()  # endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_*


def _console_exporter(_service_name: str, _role: str) -> SpanExporter:
    return ConsoleSpanExporter()  # stdout; logs own stderr


def _file_exporter(service_name: str, role: str) -> SpanExporter:
    directory = Path(os.environ.get("CLEARHOUSE_TRACES_DIR") or DEFAULT_TRACES_DIR)
    return OtlpJsonFileExporter(directory.absolute(), service_name=service_name, role=role)


_EXPORTER_FACTORIES = {"otlp": _otlp_exporter, "console": _console_exporter, "file": _file_exporter}


# --- the OTLP JSON file exporter ---------------------------------------------------------


class OtlpJsonFileExporter(SpanExporter):
    """Appends each batch as one OTLP/JSON `ExportTraceServiceRequest` line, the format
    the OpenTelemetry Collector's file exporter writes, to `<service>-<role>-<pid>.jsonl`.

    One file per process means no other writer ever appends to it; one `write` per batch
    on an O_APPEND descriptor means a reader sees whole lines, except at worst a partial
    last line while a batch is being written (readers skip it)."""

    def __init__(self, directory: Path, *, service_name: str, role: str) -> None:
        self.directory = Path(directory)
        self._stem = f"{service_name}-{role}"
        self._warned = False

    @property
    def path(self) -> Path:
        # The pid is read per export so a forked child never appends to its parent's file.
        return self.directory / f"{self._stem}-{os.getpid()}.jsonl"

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _append(self.path, encode_otlp_json(spans) + b"\n")
        except OSError as exc:
            if not self._warned:  # once: an unwritable directory would otherwise log 5 times a second
                log.warning("cannot write spans to %s: %s", self.path, exc)
                self._warned = True
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing is held open between batches."""

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it in one write; a short write (disk full) continues
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


# --- redaction of exported spans ---------------------------------------------------------


class RedactingSpanExporter(SpanExporter):
    """Wraps an exporter so that no span leaves the process with a parameter value, a
    body, a credential or an unmasked IBAN/name, whichever instrumentation recorded it.

    Attribute keys decide first (`shared.redaction.masker_for`); string values are then
    scrubbed for what is recognisable on its own (IBANs, SQL parameter lists in exception
    texts). Spans that need no change are passed through as they are."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([redact_span(span) for span in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


def redact_span(span: ReadableSpan) -> ReadableSpan:
    attributes = redact_attributes(span.attributes)
    events = [_redact_event(event) for event in span.events]
    status = _redact_status(span.status)
    unchanged = (
        attributes is span.attributes
        and all(new is old for new, old in zip(events, span.events, strict=True))
        and status is span.status
    )
    if unchanged:
        return span
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def redact_attributes(attributes: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The same mapping when nothing needed masking, else a cleaned copy."""
    if not attributes:
        return attributes
    cleaned: dict[str, Any] = {}
    for key, value in attributes.items():
        if _FORBIDDEN_ATTRIBUTE.search(key):
            continue
        cleaned[key] = _redact_attribute_value(key, value)
    changed = len(cleaned) != len(attributes) or any(cleaned[k] != attributes[k] for k in cleaned)
    return cleaned if changed else attributes


def _redact_attribute_value(key: str, value: Any) -> Any:
    masker = redaction.masker_for(key)
    if isinstance(value, tuple | list):
        return tuple(_redact_scalar(masker, item) for item in value)
    return _redact_scalar(masker, value)


def _redact_scalar(masker, value: Any) -> Any:
    if masker is not None:
        return masker(value)
    return redaction.scrub_text(value) if isinstance(value, str) else value


def _redact_event(event: Event) -> Event:
    attributes = redact_attributes(event.attributes)
    if attributes is event.attributes:
        return event
    return Event(event.name, attributes, event.timestamp)


def _redact_status(status: Status) -> Status:
    if not status.description:
        return status
    description = redaction.scrub_text(status.description)
    return status if description == status.description else Status(status.status_code, description)


# --- instrumentation ---------------------------------------------------------------------


def instrument_engine(engine) -> None:
    """Trace every statement of one engine (AsyncEngine or Engine); safe to call twice.

    The statement text is recorded, bound parameters are not (the instrumentation never
    reads them). The engine tracer is attached directly rather than through
    `SQLAlchemyInstrumentor().instrument(engine=...)`: the instrumentor is a process-wide
    singleton that accepts only the first engine and also patches `create_engine` and
    `Engine.connect` globally (a span per pool checkout), which we do not want."""
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.instrumentation.sqlalchemy.version import __version__

    sync_engine = getattr(engine, "sync_engine", engine)
    if sync_engine in _instrumented_engines:
        return
    tracer = trace.get_tracer("opentelemetry.instrumentation.sqlalchemy", __version__)
    connections = metrics.get_meter("opentelemetry.instrumentation.sqlalchemy", __version__).create_up_down_counter(
        "db.client.connections.usage", unit="connections", description="Connections by state"
    )
    EngineTracer(tracer, sync_engine, connections, enable_commenter=False)
    _instrumented_engines.add(sync_engine)


def instrument_httpx() -> None:
    """Trace outgoing httpx calls and send `traceparent` with them (process-wide).

    The httpx instrumentation records method, URL and status, never bodies."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    instrumentor = HTTPXClientInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


def instrument_app(app) -> None:
    """Trace every request of a FastAPI app except probes and metric scrapes. Call before
    the app starts serving (the middleware stack is built on the first request).

    Bodies are never read by the instrumentation; headers are recorded only when
    OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_* ask for them, and credential headers are
    then replaced by [REDACTED]. The per-message ASGI `receive`/`send` spans are left out:
    they double a waterfall's length and say nothing a request span does not."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        excluded_urls=_excluded_urls(),
        exclude_spans=["receive", "send"],
        http_capture_headers_sanitize_fields=_sanitized_headers(),
    )


def _excluded_urls() -> str:
    from_env = os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS") or os.environ.get("OTEL_PYTHON_EXCLUDED_URLS")
    return ",".join(filter(None, [_UNTRACED_PATHS, from_env]))


def _sanitized_headers() -> list[str]:
    from_env = os.environ.get("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", "")
    return _SANITIZED_HEADERS + [h.strip() for h in from_env.split(",") if h.strip()]


# --- Kafka hops --------------------------------------------------------------------------


def traceparent_of_current_span() -> str | None:
    """The W3C `traceparent` of the active span, for an event row or a Kafka header."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def context_from_traceparent(traceparent: str | None) -> Context:
    """A context whose parent is the span `traceparent` names; an empty context (a new
    root) when it is missing or malformed."""
    if not traceparent:
        return Context()
    return _PROPAGATOR.extract({"traceparent": traceparent}, context=Context())


_OPERATIONS = {SpanKind.PRODUCER: ("publish", "send"), SpanKind.CONSUMER: ("process", "process")}


@contextmanager
def kafka_span(
    name: str,
    *,
    kind: SpanKind,
    parent_traceparent: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    topic: str | None = None,
    message_id: str | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> Iterator[trace.Span]:
    """A PRODUCER (relay publish) or CONSUMER (handler process) span, made current.

    Its parent is the span `parent_traceparent` names (the event row's or the message
    header's), so one trace runs from the HTTP request through Kafka into every consumer;
    without a valid one, the current context. An exception is recorded and re-raised.
    `tracer_provider` defaults to the global one, as in every OpenTelemetry instrumentation."""
    if kind not in _OPERATIONS:
        raise ValueError(f"kafka_span kind must be PRODUCER or CONSUMER, not {kind}")
    legacy_operation, operation_type = _OPERATIONS[kind]
    span_attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation": legacy_operation,
        # The current semantic conventions name the same thing messaging.operation.type.
        "messaging.operation.type": operation_type,
    }
    if topic:
        span_attributes["messaging.destination.name"] = topic
    if message_id:
        span_attributes["messaging.message.id"] = message_id
    span_attributes.update(attributes or {})
    tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
    with tracer.start_as_current_span(
        name, context=_parent_context(parent_traceparent), kind=kind, attributes=span_attributes
    ) as span:
        yield span


def _parent_context(traceparent: str | None) -> Context | None:
    if traceparent:
        candidate = context_from_traceparent(traceparent)
        if trace.get_current_span(candidate).get_span_context().is_valid:
            return candidate
        log.warning("ignoring malformed traceparent %r", traceparent[:80])
    return None  # the current context
