"""Read the OTLP JSON span files the platform writes and draw one trace as a terminal
waterfall, for `clearhouse trace <trace_id>` and `clearhouse trace --payment <id>`.

    trace 4bf92f3577b34da6a3ce929d0e0e4736 · 5 spans · gateway, payments, approvals · 84.0 ms · 1 ERROR
    POST /v1/payments                          gateway                  84.0 ms │████████████████│
    └─ POST /v1/payments                       payments                 57.0 ms │███████████     │
       └─ [→kafka] publish payments.events     payments/relay            4.0 ms │           █    │
          └─ [kafka→] process payments.events  approvals/consumer       12.0 ms │            ███ │
             └─ INSERT approvals               approvals/consumer        2.0 ms │             ▓  │  ✗ ERROR deadlock detected

Producer and consumer spans (the Kafka hops) are marked `[→kafka]` and `[kafka→]`; a
span with error status ends with `✗ ERROR` and its message.

Input is what `shared.telemetry.OtlpJsonFileExporter` (or a collector's file exporter)
writes: one ExportTraceServiceRequest JSON object per line. Files may be read while
processes are still appending, so an unparseable line (a partly written last one) is
skipped, never fatal. This module only reads; it never changes or deletes trace files.
"""

from __future__ import annotations

import base64
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# OTLP SpanKind numbers (OTLP/JSON writes enums as integers; names are accepted too).
KIND_NAMES = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_NAMES = {0: "UNSET", 1: "OK", 2: "ERROR"}
ROLE_ATTRIBUTE = "clearhouse.role"
BAR_WIDTH = 40
MAX_LABEL_WIDTH = 64
_SERVICE_PREFIX = "clearhouse-"


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str  # SERVER, CLIENT, PRODUCER, CONSUMER, INTERNAL, UNSPECIFIED
    start_ns: int
    end_ns: int
    service: str
    role: str | None = None
    status: str = "UNSET"
    status_message: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    events: tuple[dict[str, Any], ...] = ()

    @property
    def duration_ms(self) -> float:
        return max(self.end_ns - self.start_ns, 0) / 1e6

    @property
    def is_error(self) -> bool:
        return self.status == "ERROR"

    @property
    def is_kafka_hop(self) -> bool:
        return self.kind in ("PRODUCER", "CONSUMER")


# --- reading -----------------------------------------------------------------------------


def load_spans(traces_dir: str | Path) -> list[Span]:
    """Every span in every `*.jsonl` file of `traces_dir` (none if it does not exist)."""
    directory = Path(traces_dir)
    if not directory.is_dir():
        return []
    spans: list[Span] = []
    for path in sorted(directory.glob("*.jsonl")):
        for document in _documents(path):
            spans.extend(spans_from_request(document))
    return spans


def spans_from_request(document: dict[str, Any]) -> Iterator[Span]:
    """The spans of one ExportTraceServiceRequest in OTLP/JSON form."""
    for resource_spans in document.get("resourceSpans") or ():
        resource = _attributes((resource_spans.get("resource") or {}).get("attributes"))
        service = str(resource.get("service.name", "unknown_service"))
        role = resource.get(ROLE_ATTRIBUTE)
        for scope_spans in resource_spans.get("scopeSpans") or ():
            for raw in scope_spans.get("spans") or ():
                span = _span(raw, service, role)
                if span is not None:
                    yield span


def _documents(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return  # removed or unreadable between listing and reading
    for line in lines:
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except ValueError:
            continue  # a batch still being written
        if isinstance(document, dict):
            yield document


def _span(raw: dict[str, Any], service: str, role: Any) -> Span | None:
    trace_id, span_id = _id(raw.get("traceId")), _id(raw.get("spanId"))
    if not trace_id or not span_id:
        return None
    status = raw.get("status") or {}
    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=_id(raw.get("parentSpanId")) or None,
        name=str(raw.get("name", "")),
        kind=_enum(raw.get("kind", 0), KIND_NAMES, "SPAN_KIND_"),
        start_ns=int(raw.get("startTimeUnixNano") or 0),
        end_ns=int(raw.get("endTimeUnixNano") or 0),
        service=service,
        role=str(role) if role is not None else None,
        status=_enum(status.get("code", 0), STATUS_NAMES, "STATUS_CODE_"),
        status_message=status.get("message") or None,
        attributes=_attributes(raw.get("attributes")),
        events=tuple(
            {"name": e.get("name", ""), "attributes": _attributes(e.get("attributes"))} for e in raw.get("events") or ()
        ),
    )


def _id(value: Any) -> str:
    """OTLP/JSON ids are hex; protobuf's own JSON mapping (some tools) writes base64."""
    if not value:
        return ""
    text = str(value)
    if all(ch in "0123456789abcdefABCDEF" for ch in text) and len(text) in (16, 32):
        return text.lower()
    try:
        return base64.b64decode(text, validate=True).hex()
    except ValueError:
        return text.lower()


def _enum(value: Any, names: dict[int, str], prefix: str) -> str:
    if isinstance(value, str) and not value.isdigit():
        return value.removeprefix(prefix)
    return names.get(int(value), "UNSPECIFIED")


def _attributes(items: Iterable[dict[str, Any]] | None) -> dict[str, Any]:
    return {item.get("key", ""): _any_value(item.get("value") or {}) for item in items or ()}


def _any_value(value: dict[str, Any]) -> Any:
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])  # int64 travels as a JSON string
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [_any_value(v) for v in (value["arrayValue"] or {}).get("values") or ()]
    if "kvlistValue" in value:
        return _attributes((value["kvlistValue"] or {}).get("values"))
    if "bytesValue" in value:
        return value["bytesValue"]
    return None


# --- finding -----------------------------------------------------------------------------


def find_trace(spans: Iterable[Span], trace_id: str) -> list[Span]:
    """The spans of one trace, earliest first."""
    wanted = trace_id.strip().lower()
    return sorted((s for s in spans if s.trace_id == wanted), key=lambda s: (s.start_ns, s.end_ns))


def trace_ids_for_attribute(spans: Iterable[Span], key: str, value: Any) -> list[str]:
    """Ids of the traces in which some span carries attribute `key` = `value` (compared as
    text, so `--payment <id>` matches whatever type recorded it), oldest trace first."""
    first_seen: dict[str, int] = {}
    for span in spans:
        if key in span.attributes and str(span.attributes[key]) == str(value):
            first_seen[span.trace_id] = min(first_seen.get(span.trace_id, span.start_ns), span.start_ns)
    return sorted(first_seen, key=first_seen.__getitem__)


# --- drawing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    span: Span
    prefix: str  # tree drawing before the name


def render_waterfall(spans: Iterable[Span], *, bar_width: int = BAR_WIDTH) -> str:
    """A waterfall per trace in `spans` (normally one), as text for a terminal."""
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        by_trace[span.trace_id].append(span)
    if not by_trace:
        return "no spans"
    ordered = sorted(by_trace.values(), key=lambda group: min(s.start_ns for s in group))
    return "\n\n".join(_render_trace(group, bar_width) for group in ordered)


def _render_trace(spans: list[Span], bar_width: int) -> str:
    start = min(s.start_ns for s in spans)
    end = max(max(s.end_ns, s.start_ns) for s in spans)
    total = max(end - start, 1)
    rows = list(_tree_rows(spans))
    labels = [_label(row) for row in rows]
    services = [_service_label(row.span) for row in rows]
    label_width = min(max(len(label) for label in labels), MAX_LABEL_WIDTH)
    service_width = max(len(s) for s in services)
    lines = [_header(spans, total)]
    for row, label, service in zip(rows, labels, services, strict=True):
        bar = _bar(row.span, start, total, bar_width)
        line = f"{_fit(label, label_width)}  {service:<{service_width}}  {row.span.duration_ms:9.1f} ms │{bar}│"
        lines.append((line + _error_note(row.span)).rstrip())
    return "\n".join(lines)


def _header(spans: list[Span], total_ns: int) -> str:
    services = list(dict.fromkeys(_short_service(s.service) for s in sorted(spans, key=lambda s: s.start_ns)))
    errors = sum(1 for s in spans if s.is_error)
    count = f"{len(spans)} span" + ("" if len(spans) == 1 else "s")
    parts = [f"trace {spans[0].trace_id}", count, ", ".join(services), f"{total_ns / 1e6:.1f} ms"]
    if errors:
        parts.append(f"{errors} ERROR")
    return " · ".join(parts)


def _tree_rows(spans: list[Span]) -> Iterator[_Row]:
    """Depth first, children by start time. A span whose parent is not in the set (not
    exported yet, or from a process that wrote elsewhere) is drawn as a root."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[Span]] = defaultdict(list)
    for span in spans:
        parent = span.parent_span_id if span.parent_span_id in ids and span.parent_span_id != span.span_id else None
        children[parent].append(span)
    for group in children.values():
        group.sort(key=lambda s: (s.start_ns, s.end_ns))
    seen: set[str] = set()
    for root in children[None]:
        yield from _walk(root, children, seen, prefix="", is_last=True, is_root=True)
    # Spans caught in a parent cycle (malformed input) are never reached from a root.
    for span in sorted(spans, key=lambda s: s.start_ns):
        if span.span_id not in seen:
            yield from _walk(span, children, seen, prefix="", is_last=True, is_root=True)


def _walk(span: Span, children, seen: set[str], *, prefix: str, is_last: bool, is_root: bool) -> Iterator[_Row]:
    if span.span_id in seen:
        return
    seen.add(span.span_id)
    branch = "" if is_root else ("└─ " if is_last else "├─ ")
    yield _Row(span, prefix + branch)
    child_prefix = prefix if is_root else prefix + ("   " if is_last else "│  ")
    kids = children.get(span.span_id, [])
    for index, child in enumerate(kids):
        yield from _walk(child, children, seen, prefix=child_prefix, is_last=index == len(kids) - 1, is_root=False)


def _label(row: _Row) -> str:
    return f"{row.prefix}{_kafka_marker(row.span)}{row.span.name}"


def _kafka_marker(span: Span) -> str:
    """Kafka hops stand out: they are where a trace crosses from one service to another
    asynchronously, and where time is lost in a backlog."""
    if span.kind == "PRODUCER":
        return "[→kafka] "
    if span.kind == "CONSUMER":
        return "[kafka→] "
    return ""


def _service_label(span: Span) -> str:
    service = _short_service(span.service)
    return service if not span.role or span.role == "api" else f"{service}/{span.role}"


def _short_service(service: str) -> str:
    return service.removeprefix(_SERVICE_PREFIX)


def _bar(span: Span, trace_start: int, total: int, width: int) -> str:
    offset = min(int((span.start_ns - trace_start) / total * width), width - 1)
    length = max(1, math.ceil(max(span.end_ns - span.start_ns, 0) / total * width))
    length = min(length, width - offset)
    char = "▓" if span.is_error else "█"
    return " " * offset + char * length + " " * (width - offset - length)


def _error_note(span: Span) -> str:
    if not span.is_error:
        return ""
    detail = (span.status_message or _exception_summary(span)).strip()
    detail = detail.splitlines()[0][:120] if detail else ""  # one screen line, whatever the message
    return f"  ✗ ERROR {detail}".rstrip()


def _exception_summary(span: Span) -> str:
    for event in span.events:
        if event["name"] == "exception":
            attrs = event["attributes"]
            return f"{attrs.get('exception.type', '')}: {attrs.get('exception.message', '')}".strip(": ")
    return ""


def _fit(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"
