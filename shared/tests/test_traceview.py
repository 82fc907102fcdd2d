"""`clearhouse trace` reading OTLP JSON span files and drawing waterfalls: what an operator
sees for well-formed, partial and odd input. (The round trip from the real exporter is in
test_telemetry.py.)"""

from __future__ import annotations

import base64
import json
import re

from clearhouse.traceview import find_trace, load_spans, render_waterfall, spans_from_request, trace_ids_for_attribute

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"
MS = 1_000_000
T0 = 1_700_000_000_000 * MS


def span(span_id, name, start_ms, end_ms, *, parent=None, kind=1, trace_id=TRACE, status=None, attributes=None,
         events=None):
    raw = {
        "traceId": trace_id,
        "spanId": span_id,
        "name": name,
        "kind": kind,
        "startTimeUnixNano": str(T0 + start_ms * MS),
        "endTimeUnixNano": str(T0 + end_ms * MS),
        "attributes": [{"key": k, "value": v} for k, v in (attributes or {}).items()],
        "status": status or {},
    }
    if parent:
        raw["parentSpanId"] = parent
    if events:
        raw["events"] = events
    return raw


def request(service, *spans, role=None):
    resource = [{"key": "service.name", "value": {"stringValue": f"clearhouse-{service}"}}]
    if role:
        resource.append({"key": "clearhouse.role", "value": {"stringValue": role}})
    scope_spans = [{"scope": {"name": "t"}, "spans": list(spans)}]
    return {"resourceSpans": [{"resource": {"attributes": resource}, "scopeSpans": scope_spans}]}


def write(path, *documents):
    path.write_text("".join(json.dumps(d) + "\n" for d in documents))


def labels(text: str) -> list[str]:
    return [re.match(r"(.*?\S)\s{2,}", line).group(1) for line in text.splitlines()[1:]]


def test_spans_from_several_files_form_one_tree(tmp_path):
    write(tmp_path / "gateway-api-1.jsonl", request("gateway", span("a" * 16, "POST /v1/payments", 0, 100, kind=2)))
    write(
        tmp_path / "payments-api-2.jsonl",
        request("payments", span("b" * 16, "POST /v1/payments", 10, 90, parent="a" * 16, kind=2)),
        request("payments", span("c" * 16, "publish payments.events", 60, 70, parent="b" * 16, kind=4), role="relay"),
    )
    write(tmp_path / "approvals-consumer-3.jsonl",
          request("approvals", span("d" * 16, "process payments.events", 75, 100, parent="c" * 16, kind=5),
                  role="consumer"))
    text = render_waterfall(find_trace(load_spans(tmp_path), TRACE))
    assert text.splitlines()[0] == f"trace {TRACE} · 4 spans · gateway, payments, approvals · 100.0 ms"
    assert labels(text) == [
        "POST /v1/payments",
        "└─ POST /v1/payments",
        "   └─ [→kafka] publish payments.events",
        "      └─ [kafka→] process payments.events",
    ]
    assert "payments/relay" in text and "approvals/consumer" in text


def test_bars_are_placed_by_offset_and_duration_within_the_trace():
    spans = list(spans_from_request(request(
        "ledger",
        span("a" * 16, "root", 0, 100),
        span("b" * 16, "second half", 50, 100, parent="a" * 16),
        span("c" * 16, "first tenth", 0, 10, parent="a" * 16),
    )))
    lines = render_waterfall(spans, bar_width=40).splitlines()[1:]
    bars = [line[line.index("│") + 1: line.rindex("│")] for line in lines]
    assert bars == ["█" * 40, "█" * 4 + " " * 36, " " * 20 + "█" * 20]


def test_orphans_are_drawn_at_the_root_and_children_by_start_time():
    spans = list(spans_from_request(request(
        "ledger",
        span("b" * 16, "late child", 30, 40, parent="a" * 16),
        span("c" * 16, "orphan", 0, 10, parent="f" * 16),  # its parent was never exported
        span("a" * 16, "root", 5, 50),
        span("d" * 16, "early child", 6, 8, parent="a" * 16),
    )))
    assert labels(render_waterfall(spans)) == ["orphan", "root", "├─ early child", "└─ late child"]


def test_errors_are_marked_with_their_message_or_exception():
    exception = {"name": "exception", "attributes": [
        {"key": "exception.type", "value": {"stringValue": "InsufficientFunds"}},
        {"key": "exception.message", "value": {"stringValue": "available 10.00 EUR"}},
    ]}
    spans = list(spans_from_request(request(
        "ledger",
        span("a" * 16, "with status", 0, 10, status={"code": 2, "message": "deadlock detected\nDETAIL: ..."}),
        span("b" * 16, "with exception", 0, 10, status={"code": 2}, events=[exception], trace_id=OTHER_TRACE),
        span("c" * 16, "fine", 0, 10, status={"code": 1}, trace_id=OTHER_TRACE),
    )))
    text = render_waterfall(spans)
    assert "with status" in text and text.splitlines()[1].endswith("✗ ERROR deadlock detected")
    assert "✗ ERROR InsufficientFunds: available 10.00 EUR" in text
    assert " · 1 ERROR" in text and "fine" in text
    fine_line = next(line for line in text.splitlines() if "fine" in line)
    assert "ERROR" not in fine_line


def test_protobuf_style_json_with_base64_ids_and_enum_names_is_read_too():
    def b64(hex_id):
        return base64.b64encode(bytes.fromhex(hex_id)).decode()

    raw = span(b64("ab" * 8), "GET /x", 0, 5, parent=b64("cd" * 8), trace_id=b64(TRACE))
    raw["kind"] = "SPAN_KIND_SERVER"
    raw["status"] = {"code": "STATUS_CODE_ERROR"}
    (parsed,) = spans_from_request(request("gateway", raw))
    assert (parsed.trace_id, parsed.span_id, parsed.parent_span_id) == (TRACE, "ab" * 8, "cd" * 8)
    assert parsed.kind == "SERVER" and parsed.is_error


def test_attribute_values_are_decoded_and_search_finds_traces_oldest_first():
    spans = list(spans_from_request(request(
        "payments",
        span("a" * 16, "late", 50, 60, trace_id=TRACE,
             attributes={"clearhouse.payment_id": {"stringValue": "pay_1"}}),
        span("b" * 16, "early", 0, 10, trace_id=OTHER_TRACE, attributes={
            "clearhouse.payment_id": {"stringValue": "pay_1"},
            "retries": {"intValue": "3"},
            "ratio": {"doubleValue": 0.5},
            "ok": {"boolValue": True},
            "tags": {"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": "2"}]}},
        }),
    )))
    assert trace_ids_for_attribute(spans, "clearhouse.payment_id", "pay_1") == [OTHER_TRACE, TRACE]
    assert trace_ids_for_attribute(spans, "retries", 3) == [OTHER_TRACE]
    assert trace_ids_for_attribute(spans, "clearhouse.payment_id", "pay_2") == []
    early = find_trace(spans, OTHER_TRACE.upper())[0]
    assert (early.attributes["ratio"], early.attributes["ok"], early.attributes["tags"]) == (0.5, True, ["a", 2])


def test_unreadable_lines_and_missing_directories_are_not_fatal(tmp_path):
    good = json.dumps(request("ledger", span("a" * 16, "kept", 0, 1)))
    (tmp_path / "ledger-api-1.jsonl").write_text(f"{good}\nnot json\n\n[1, 2]\n{good[:40]}")
    (tmp_path / "notes.txt").write_text("not a span file")
    assert [s.name for s in load_spans(tmp_path)] == ["kept"]
    assert load_spans(tmp_path / "absent") == []
    assert render_waterfall([]) == "no spans"


def test_a_parent_cycle_in_bad_data_still_renders_every_span_once():
    spans = list(spans_from_request(request(
        "ledger",
        span("a" * 16, "one", 0, 10, parent="b" * 16),
        span("b" * 16, "two", 1, 10, parent="a" * 16),
        span("c" * 16, "self", 2, 10, parent="c" * 16),
    )))
    drawn = labels(render_waterfall(spans))
    assert sorted(label.split()[-1] for label in drawn) == ["one", "self", "two"]
