"""One error shape for every Clearhouse API: RFC 9457 `application/problem+json`.

Services raise `DomainError` subclasses (each carries its HTTP status and a stable,
machine-readable `code`); `install_problem_handlers` turns those, FastAPI's validation
errors, Starlette's HTTP errors and anything unexpected into the same body:

    {"type": "https://clearhouse.dev/problems/<code>", "title": ..., "status": ...,
     "detail": ..., "code": ..., "trace_id": ..., "errors": [{"pointer", "detail", "code"}]}

This module must never let an exception's text, a stack trace, SQL or the offending input
value reach a client: an unexpected exception becomes a generic 500 whose trace id is the
only link to the full traceback in the logs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared import context

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://clearhouse.dev/problems/"
_RESERVED_MEMBERS = frozenset({"type", "title", "status", "detail", "code", "trace_id", "errors"})

# Codes for HTTP errors raised by the framework itself (unknown route, wrong method, ...).
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}


class DomainError(Exception):
    """Base of every error a service means to answer with. Subclasses set the class
    attributes; `detail` is human-readable and specific to this occurrence; `extra`
    members (e.g. `missing_scope=...`) are added to the problem body as they are."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    title: ClassVar[str] = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[dict] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        clash = _RESERVED_MEMBERS & extra.keys()
        if clash:
            raise ValueError(f"problem members {sorted(clash)} are reserved")
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = dict(headers or {})
        self.extra = extra

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


class BadRequest(DomainError):
    status, code, title = 400, "bad_request", "Bad request"


class Unauthorized(DomainError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class Forbidden(DomainError):
    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(DomainError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(DomainError):
    status, code, title = 409, "conflict", "Conflict"


class PayloadTooLarge(DomainError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class UnsupportedMediaType(DomainError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class ValidationFailed(DomainError):
    status, code, title = 422, "validation_error", "Validation failed"


class TooManyRequests(DomainError):
    status, code, title = 429, "rate_limited", "Too many requests"


class ServiceUnavailable(DomainError):
    status, code, title = 503, "service_unavailable", "Service unavailable"


# --- the body ------------------------------------------------------------------------


def current_trace_id() -> str | None:
    """The active OpenTelemetry trace id, else the request id bound for this request."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        return f"{span_context.trace_id:032x}"
    return context.current().request_id


def problem_body(
    status: int,
    *,
    code: str,
    detail: str,
    title: str | None = None,
    errors: list[dict] | None = None,
    trace_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
        "code": code,
        # Always present so a client can quote it; a fresh id beats none when nothing is bound.
        "trace_id": trace_id or current_trace_id() or uuid.uuid4().hex,
    }
    if errors:
        body["errors"] = errors
    body.update(extra)
    return body


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem_response(
    status: int,
    *,
    code: str,
    detail: str,
    title: str | None = None,
    errors: list[dict] | None = None,
    headers: Mapping[str, str] | None = None,
    trace_id: str | None = None,
    **extra: Any,
) -> ProblemResponse:
    body = problem_body(status, code=code, detail=detail, title=title, errors=errors, trace_id=trace_id, **extra)
    return ProblemResponse(body, status_code=status, headers=dict(headers or {}))


def domain_error_response(exc: DomainError) -> ProblemResponse:
    return problem_response(
        exc.status, code=exc.code, title=exc.title, detail=exc.detail, errors=exc.errors, headers=exc.headers,
        **exc.extra,
    )


def unhandled_error_response(exc: BaseException, *, method: str, path: str) -> ProblemResponse:
    """A generic 500 for the client; the full story, tied to the same trace id, goes to
    the log only."""
    trace_id = current_trace_id() or uuid.uuid4().hex
    logger.error("unhandled %s answering %s %s (trace_id=%s)", type(exc).__name__, method, path, trace_id,
                 exc_info=exc)
    return problem_response(
        500, code="internal_error", title="Internal error", trace_id=trace_id,
        detail="The server failed to answer this request. Quote the trace_id when reporting it.",
    )


# --- translating framework errors ----------------------------------------------------


def json_pointer(location: Iterable[Any]) -> str:
    """RFC 6901 pointer for a pydantic error location, e.g. ('body', 'entries', 0, 'amount')."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in location)


def field_problems(validation_errors: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    # `input` is deliberately dropped: it may be an account number or a secret.
    return [
        {"pointer": json_pointer(error.get("loc", ())), "detail": str(error.get("msg", "")),
         "code": str(error.get("type"))}
        for error in validation_errors
    ]


def validation_error_response(exc: RequestValidationError) -> ProblemResponse:
    errors = list(exc.errors())
    if any(error.get("type") == "json_invalid" for error in errors):
        return problem_response(400, code="malformed_json", title="Malformed JSON",
                                detail="The request body is not valid JSON.")
    count = len(errors)
    return problem_response(
        422, code="validation_error", title="Validation failed",
        detail=f"The request has {count} invalid field{'s' if count != 1 else ''}.",
        errors=field_problems(errors),
    )


def http_error_response(exc: StarletteHTTPException) -> ProblemResponse:
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail else _phrase(status)
    return problem_response(status, code=_HTTP_CODES.get(status, f"http_{status}"), detail=detail,
                            headers=exc.headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def install_problem_handlers(app: FastAPI) -> None:
    async def on_domain_error(request: Request, exc: DomainError) -> ProblemResponse:
        return domain_error_response(exc)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> ProblemResponse:
        return validation_error_response(exc)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> ProblemResponse:
        return http_error_response(exc)

    async def on_unexpected(request: Request, exc: Exception) -> ProblemResponse:
        # Last resort (Starlette's ServerErrorMiddleware); `shared.api` catches earlier.
        return unhandled_error_response(exc, method=request.method, path=request.url.path)

    app.add_exception_handler(DomainError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


# --- OpenAPI -------------------------------------------------------------------------


class FieldProblem(BaseModel):
    pointer: str = Field(description="RFC 6901 JSON pointer to the offending field, e.g. /body/entries/0/amount")
    detail: str
    code: str = Field(description="Stable machine-readable reason, e.g. int_type, missing")


class Problem(BaseModel):
    """RFC 9457 problem details, as every Clearhouse error is answered."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["https://clearhouse.dev/problems/not_found"])
    title: str
    status: int
    detail: str
    code: str = Field(description="Stable, machine-readable error code (snake_case)")
    trace_id: str = Field(description="Quote it when reporting a problem; it finds the trace and the logs")
    errors: list[FieldProblem] | None = None


def problem_responses(*errors: int | type[DomainError]) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: `problem_responses(404, InsufficientFunds)`. Error classes
    sharing a status are listed together under it, by code."""
    codes_by_status: dict[int, list[str]] = {}
    for error in errors:
        status, code = (error, None) if isinstance(error, int) else (error.status, error.code)
        codes = codes_by_status.setdefault(status, [])
        if code and code not in codes:
            codes.append(code)
    return {
        status: {
            "model": Problem,
            "description": _phrase(status) + (f" ({', '.join(codes)})" if codes else ""),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status, codes in sorted(codes_by_status.items())
    }
