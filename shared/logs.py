"""JSON log lines for every Clearhouse process (API, relay, consumer), joined to traces.

One JSON object per line on stderr, so a log pipeline needs no parsing rules:

    {"ts": "2025-01-31T09:15:02.123Z", "level": "INFO", "logger": "payments.service",
     "message": "payment submitted", "service": "payments", "role": "api",
     "trace_id": "4bf9...", "span_id": "00f0...", "correlation_id": "...", "payment_id": "..."}

`trace_id`/`span_id` come from the active OpenTelemetry span and `correlation_id`,
`request_id`, `tenant_id`, `principal` from `shared.context`; fields passed with
`extra=` are kept as top-level keys. Uvicorn's loggers are routed through the same
formatter by `uvicorn_log_config()`.

A log line must never carry a secret or unmasked personal data: every record passes the
redaction filter (`shared.redaction`) on the handler before it is formatted, and logging
must never raise into the code that logs.
"""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from opentelemetry import trace

from shared import context, redaction

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
_HANDLER_NAME = "clearhouse-json"
_configured: dict[str, str] = {}  # the latest setup_logging call's service, role and level


class RedactionFilter(logging.Filter):
    """Masks sensitive `extra=` fields and recognisable data in the message, in place.

    Attached to the handler rather than a logger: logger filters do not see records that
    propagate up from child loggers, handler filters see every record they will write."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key in _extra_keys(record):
            setattr(record, key, _redacted_field(key, getattr(record, key)))
        if record.name == "uvicorn.access":
            record._access_args = record.args  # the formatter turns them into fields
        record.msg = redaction.scrub_text(_safe_message(record))
        record.args = None  # already merged into msg; merging twice could fail on a '%'
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; never raises (a failing field becomes its repr).

    Without an explicit service name and role it uses those of the latest
    `setup_logging` call at format time: uvicorn configures its loggers before the app
    factory that calls `setup_logging` has run."""

    def __init__(self, service_name: str | None = None, role: str | None = None) -> None:
        super().__init__()
        self._service_name = service_name
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        fields = self._core(record)
        fields.update(_trace_fields())
        fields.update(_context_fields())
        fields.update(_access_fields(record))
        for key in _extra_keys(record):
            fields[key if key not in fields else f"extra_{key}"] = getattr(record, key)
        fields.update(_exception_fields(record))
        return _dumps(fields)

    def _core(self, record: logging.LogRecord) -> dict[str, Any]:
        return {
            "ts": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": _safe_message(record),
            "service": self._service_name or _configured.get("service_name", "clearhouse"),
            "role": self._role or _configured.get("role", "api"),
        }


def make_json_handler(
    service_name: str | None = None, role: str | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """A stderr handler with the redaction filter and the JSON formatter; also the factory
    `uvicorn_log_config()` names, so uvicorn's handler is built the same way."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RedactionFilter())
    handler.setFormatter(JsonFormatter(service_name, role))
    return handler


def setup_logging(
    service_name: str, *, level: str | int = "INFO", role: str = "api", stream: TextIO | None = None
) -> logging.Handler:
    """Route the root logger to one JSON handler. Calling it again replaces the handler it
    installed before (and leaves handlers others added, e.g. pytest's, alone)."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    handler = make_json_handler(service_name, role, stream)
    root.addHandler(handler)
    root.setLevel(level)
    _configured.update(service_name=service_name, role=role, level=logging.getLevelName(root.level))
    return handler


def uvicorn_log_config(
    service_name: str | None = None, *, role: str | None = None, level: str | None = None
) -> dict[str, Any]:
    """A `logging.config.dictConfig` for `uvicorn.run(..., log_config=...)`.

    Uvicorn installs its own plain-text handlers unless given a config; this one gives its
    loggers the JSON handler instead and stops them propagating, so each line is written
    once. Service and role default to those of the latest `setup_logging` call, looked up
    when a line is written."""
    handler: dict[str, Any] = {"()": f"{__name__}.make_json_handler", "service_name": service_name, "role": role}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"json": handler},
        "loggers": {
            name: {"handlers": ["json"], "level": level or _configured.get("level", "INFO"), "propagate": False}
            for name in _UVICORN_LOGGERS
        },
    }


def _redacted_field(key: str, value: Any) -> Any:
    try:
        return redaction.redact(value, key)
    except Exception:  # a value that cannot be inspected cannot be shown either
        return "[unloggable]"


def _extra_keys(record: logging.LogRecord) -> list[str]:
    return [key for key in record.__dict__ if key not in _RECORD_ATTRIBUTES and not key.startswith("_")]


def _safe_message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad format string must not lose the line
        return f"{record.msg!r} {record.args!r}"


def _rfc3339(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _trace_fields() -> dict[str, str]:
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {"trace_id": f"{span_context.trace_id:032x}", "span_id": f"{span_context.span_id:016x}"}


def _context_fields() -> dict[str, str]:
    ctx = context.current()
    fields = {
        "correlation_id": ctx.correlation_id,
        "request_id": ctx.request_id,
        "tenant_id": ctx.tenant_id,
        "principal": ctx.principal,
    }
    # Absent ids are left out rather than written as null: lines stay short and a query
    # for a field's presence means something.
    return {key: value for key, value in fields.items() if value is not None}


def _access_fields(record: logging.LogRecord) -> dict[str, Any]:
    """uvicorn.access passes (client, method, path, http version, status) as args; keep
    them as fields so access lines can be filtered without parsing the message."""
    args = getattr(record, "_access_args", None)
    if record.name != "uvicorn.access" or not isinstance(args, tuple) or len(args) != 5:
        return {}
    client, method, path, http_version, status = args
    # The path includes the query string, where a careless client may put a key.
    return {"client": client, "method": method, "path": redaction.scrub_text(str(path)),
            "http_version": http_version, "status": status}


def _exception_fields(record: logging.LogRecord) -> dict[str, str]:
    fields = {}
    if record.exc_info and record.exc_info[0] is not None:
        exc_type, exc, tb = record.exc_info
        formatted = "".join(traceback.format_exception(exc_type, exc, tb))
        # Exception texts quote values (an IBAN that failed validation, SQL parameters).
        fields.update(exc_type=exc_type.__name__, exc=redaction.scrub_text(formatted))
    if record.stack_info:
        fields["stack"] = record.stack_info
    return fields


def _dumps(fields: dict[str, Any]) -> str:
    try:
        return orjson.dumps(fields, default=_fallback, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):  # e.g. an int beyond 64 bits deep in an extra
        return orjson.dumps({k: v if isinstance(v, str) else _fallback(v) for k, v in fields.items()}).decode()


def _fallback(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return repr(type(value))
