"""The direct OTLP/JSON encoder writes what the OTLP exporter's protobuf encoder plus
protobuf's JSON mapping would (hex ids, integer enums), for every shape a span can take."""

from __future__ import annotations

import base64

import orjson
from google.protobuf.json_format import MessageToDict
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace import set_span_in_context

from shared.otlp_json import encode_otlp_json


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans = []

    def export(self, spans):
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def reference(spans) -> dict:
    """What the file exporter wrote before: protobuf, then its JSON mapping, ids to hex."""
    document = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for resource_spans in document.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                for item in (span, *span.get("links", ())):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if item.get(key):
                            item[key] = base64.b64decode(item[key]).hex()
    return document


def record(build) -> list:
    keep = _Keep()
    provider = TracerProvider(resource=Resource.create({"service.name": "otlp-test", "n": 3, "f": 1.5, "ok": True}))
    provider.add_span_processor(SimpleSpanProcessor(keep))
    build(provider)
    return keep.spans


def test_every_span_shape_matches_the_protobuf_encoding():
    def build(provider):
        tracer = provider.get_tracer("scope.a", "1.2", schema_url="https://opentelemetry.io/schemas/1.21.0")
        remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1),
                             trace_state=TraceState([("vendor", "x1"), ("other", "y")]))
        with tracer.start_as_current_span("server", kind=SpanKind.SERVER,
                                          context=set_span_in_context(NonRecordingSpan(remote)),
                                          attributes={"s": "v", "empty": "", "i": 7, "zero": 0, "f": 2.5,
                                                      "b": False, "strings": ("a", "b"), "ints": [1, 2],
                                                      "none": ()}) as root:
            root.add_event("event", {"k": "v"})
            root.add_event("")
            with tracer.start_as_current_span("child", links=[Link(root.get_span_context(), {"l": 1}),
                                                              Link(remote)]) as child:
                child.set_status(Status(StatusCode.ERROR, "boom"))
        for kind in SpanKind:
            with provider.get_tracer("scope.b").start_as_current_span(f"kind-{kind.name}", kind=kind) as span:
                span.set_status(Status(StatusCode.OK))
        with provider.get_tracer("").start_as_current_span(""):
            pass

    spans = record(build)
    assert orjson.loads(encode_otlp_json(spans)) == reference(spans)


scalars = st.one_of(st.text(max_size=20), st.booleans(), st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=True, allow_infinity=True))
values = st.one_of(scalars, st.lists(st.text(max_size=5), max_size=3), st.lists(st.integers(-9, 9), max_size=3),
                   st.lists(st.floats(allow_nan=False), max_size=3), st.lists(st.booleans(), max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=10), values, max_size=6))
def test_any_attribute_values_match_the_protobuf_encoding(attributes):
    spans = record(lambda provider: provider.get_tracer("t").start_span("s", attributes=attributes).end())
    assert orjson.loads(encode_otlp_json(spans)) == reference(spans)
