"""Spans as OTLP/JSON (`ExportTraceServiceRequest`), the format the OpenTelemetry
Collector's file exporter writes and `clearhouse trace` reads, encoded straight from the
SDK's spans.

It writes exactly what the OTLP exporter's protobuf encoder followed by protobuf's JSON
mapping would (with OTLP/JSON's two differences: hex ids, integer enums); a test holds
the two to each other. Going through protobuf cost about as much CPU per request as the
rest of the tracing put together, on a hot path every service shares.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext

_HAS_IS_REMOTE = 0x100  # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = 0x200  # SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


def encode_otlp_json(spans: Sequence[ReadableSpan]) -> bytes:
    """Spans grouped by resource, then by instrumentation scope, in order of appearance."""
    grouped: dict[Any, dict[Any, list[dict[str, Any]]]] = {}
    for span in spans:
        scopes = grouped.setdefault(span.resource, {})
        scopes.setdefault(span.instrumentation_scope or None, []).append(_span(span))
    resource_spans = []
    for resource, scopes in grouped.items():
        scope_spans = []
        for scope, encoded in scopes.items():
            entry: dict[str, Any] = {"scope": _scope(scope), "spans": encoded}
            if scope is not None and scope.schema_url:
                entry["schemaUrl"] = scope.schema_url
            scope_spans.append(entry)
        entry = {"resource": _with_attributes({}, resource.attributes), "scopeSpans": scope_spans}
        if resource.schema_url:
            entry["schemaUrl"] = resource.schema_url
        resource_spans.append(entry)
    return orjson.dumps({"resourceSpans": resource_spans})


def _span(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    out: dict[str, Any] = {"traceId": f"{context.trace_id:032x}", "spanId": f"{context.span_id:016x}"}
    if context.trace_state:
        out["traceState"] = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
    if span.parent is not None:
        out["parentSpanId"] = f"{span.parent.span_id:016x}"
    if span.name:
        out["name"] = span.name
    out["kind"] = span.kind.value + 1  # the SDK counts from INTERNAL = 0, OTLP from UNSPECIFIED = 0
    if span.start_time:
        out["startTimeUnixNano"] = str(span.start_time)
    if span.end_time:
        out["endTimeUnixNano"] = str(span.end_time)
    _with_attributes(out, span.attributes)
    _count(out, "droppedAttributesCount", span.dropped_attributes)
    if span.events:
        out["events"] = [_event(event) for event in span.events]
    _count(out, "droppedEventsCount", span.dropped_events)
    if span.links:
        out["links"] = [_link(link) for link in span.links]
    _count(out, "droppedLinksCount", span.dropped_links)
    out["status"] = _status(span.status)
    out["flags"] = _flags(span.parent)
    return out


def _event(event) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if event.timestamp:
        out["timeUnixNano"] = str(event.timestamp)
    if event.name:
        out["name"] = event.name
    _with_attributes(out, event.attributes)
    _count(out, "droppedAttributesCount", event.dropped_attributes)
    return out


def _link(link) -> dict[str, Any]:
    out: dict[str, Any] = {"traceId": f"{link.context.trace_id:032x}", "spanId": f"{link.context.span_id:016x}"}
    _with_attributes(out, link.attributes)
    _count(out, "droppedAttributesCount", link.dropped_attributes)
    out["flags"] = _flags(link.context)
    return out


def _status(status) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if status is None:
        return out
    if status.description:
        out["message"] = status.description
    if status.status_code.value:
        out["code"] = status.status_code.value
    return out


def _scope(scope) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if scope is None:
        return out
    if scope.name:
        out["name"] = scope.name
    if scope.version:
        out["version"] = scope.version
    return _with_attributes(out, scope.attributes)


def _flags(parent: SpanContext | None) -> int:
    return _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)


def _count(out: dict[str, Any], name: str, value: int) -> None:
    if value:
        out[name] = value


def _with_attributes(out: dict[str, Any], attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    if attributes:
        out["attributes"] = [{"key": str(key), "value": _value(value)} for key, value in attributes.items()]
    return out


def _value(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": _double(value)}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode()}
    if isinstance(value, Sequence):
        return {"arrayValue": {"values": [_value(item) for item in value]} if value else {}}
    if isinstance(value, Mapping):
        items = [{"key": str(k), "value": _value(v)} for k, v in value.items()]
        return {"kvlistValue": {"values": items} if items else {}}
    raise TypeError(f"invalid attribute type {type(value).__name__}")


def _double(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value
