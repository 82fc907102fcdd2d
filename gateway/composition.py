"""Answers composed from several services, KrakenD-style: the upstream calls run
concurrently, and when one fails the answer still carries what the others returned and
says which part is missing.

    GET /v1/payments/{id}/timeline
        payments  GET /v1/payments/{id}            ─┐  the tenant's payment? (404 passes through;
        payments  GET /internal/timeline?payment_id │   down → 503/504: without it we cannot tell
        approvals GET /internal/timeline?payment_id ├─  whether the caller may see the rest)
        ledger    GET /internal/timeline?payment_id │
        recon.    GET /internal/timeline?payment_id ─┘  merged by occurred_at, oldest first

    GET /v1/payments/{id}?expand=approval,ledger_hold
        payments  GET /v1/payments/{id}            then, concurrently, by the ids it holds:
        approvals GET /v1/approvals/{approval_id}  ledger GET /v1/ledger/holds/{hold_id}

A complete answer is 200. A partial one is 206 with `partial: true`, `missing` (service
names) and `problems` (why each is missing): the status alone tells a client, a log
query or a dashboard that the answer is incomplete, and `Cache-Control: no-store` keeps
any cache from mistaking it for a range. Each call has `composition_timeout_s`; the
existence check runs alongside the timeline calls (each service scopes its own answer to
the tenant, and nothing is returned unless the check passes), so the latency is the
slowest call, not the sum.

This module must never return another tenant's data, nor answer 500 because a part failed.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import Response
from prometheus_client import Counter
from pydantic import BaseModel, Field

from gateway.errors import UpstreamError
from gateway.proxy import Caller, Gateway
from gateway.settings import UPSTREAMS
from shared.errors import DomainError, ValidationFailed, problem_response
from shared.timeline import TimelineEvent

log = logging.getLogger(__name__)

PARTIAL_ANSWERS = Counter("clearhouse_gateway_partial_answers_total", "Composed answers missing a part",
                          ["composition", "missing"])
# name -> (service, scope it needs, the payment's field naming it, the service's path)
EXPANSIONS = {"approval": ("approvals", "approvals:read", "approval_id", "/v1/approvals/{}"),
              "ledger_hold": ("ledger", "ledger:read", "hold_id", "/v1/ledger/holds/{}")}


class MissingPart(BaseModel):
    service: str
    code: str = Field(description="The problem code of the failed call, e.g. upstream_timeout")
    detail: str


class PaymentTimeline(BaseModel):
    payment_id: str
    events: list[TimelineEvent] = Field(description="Every service's events about the payment, oldest first")
    partial: bool = Field(description="True when a service's part is missing (status 206)")
    missing: list[str] = Field(description="Services whose events are missing, e.g. [\"ledger\"]")
    problems: list[MissingPart] = Field(default_factory=list)


class _Failed(Exception):
    def __init__(self, problem: DomainError) -> None:
        self.problem = problem


async def _get(gateway: Gateway, service: str, raw_path: str, headers: list) -> tuple[int, Any]:
    """(status, JSON body) of one call, or _Failed with the problem describing why not."""
    request = gateway.upstreams.build(service, "GET", raw_path.encode(), headers=headers,
                                      timeout=gateway.settings.composition_timeout_s)
    try:
        response = await gateway.upstreams.send(service, request)
    except DomainError as problem:
        raise _Failed(problem) from None
    try:
        body = orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        body = None
    return response.status_code, body


def _problem_of(service: str, outcome: BaseException | tuple[int, Any]) -> MissingPart:
    if isinstance(outcome, _Failed):
        return MissingPart(service=service, code=outcome.problem.code, detail=outcome.problem.detail)
    if isinstance(outcome, BaseException):
        return MissingPart(service=service, code="upstream_error", detail=f"The {service} part could not be read.")
    status, body = outcome
    code = body.get("code") if isinstance(body, dict) and isinstance(body.get("code"), str) else f"http_{status}"
    return MissingPart(service=service, code=code, detail=f"The {service} service answered {status}.")


def _upstream_answer(outcome: tuple[int, Any]) -> Response:
    """A non-200 answer of the payment check, passed through as the service gave it (its
    problem body); anything that is not a problem becomes one."""
    status, body = outcome
    if status >= 400 and isinstance(body, dict) and "code" in body:
        return Response(orjson.dumps(body), status_code=status, media_type="application/problem+json")
    if status >= 400:
        return problem_response(status, code=f"http_{status}", detail=f"The payments service answered {status}.")
    raise UpstreamError(f"The payments service answered {status} where a payment was expected.",
                        service="payments")


def _events_of(service: str, outcome) -> list[dict] | None:
    if isinstance(outcome, BaseException) or outcome[0] != 200:
        return None
    body = outcome[1]
    events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(events, list):
        log.error("the %s timeline answer has no events list", service)
        return None
    try:
        return [TimelineEvent.model_validate(e).model_dump() for e in events]
    except ValueError:
        log.error("the %s timeline answer holds a malformed event", service)
        return None


def _when(event: dict) -> datetime:
    return datetime.fromisoformat(event["occurred_at"])


def _respond(body: dict, missing: list[MissingPart], composition: str) -> Response:
    body["partial"] = bool(missing)
    body["missing"] = [m.service for m in missing]
    body["problems"] = [m.model_dump() for m in missing]
    for part in missing:
        PARTIAL_ANSWERS.labels(composition, part.service).inc()
    return Response(orjson.dumps(body), status_code=206 if missing else 200, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


async def payment_timeline(gateway: Gateway, caller: Caller, payment_id: str) -> Response:
    headers = gateway.internal_headers(caller)  # one token (one request id) for every part
    quoted = quote(payment_id, safe="")
    calls = [_get(gateway, "payments", f"/v1/payments/{quoted}", headers)]
    calls += [_get(gateway, service, f"/internal/timeline?payment_id={quoted}", headers) for service in UPSTREAMS]
    check, *parts = await asyncio.gather(*calls, return_exceptions=True)
    if isinstance(check, _Failed):
        raise check.problem
    if isinstance(check, BaseException):
        raise check
    if check[0] != 200:
        return _upstream_answer(check)
    events: list[dict] = []
    missing: list[MissingPart] = []
    for service, outcome in zip(UPSTREAMS, parts):
        found = _events_of(service, outcome)
        if found is None:
            missing.append(_problem_of(service, outcome))
        else:
            events.extend(found)
    try:
        events.sort(key=_when)  # stable: ties keep service order, then each service's own order
    except (TypeError, ValueError):
        log.error("timeline events carry incomparable timestamps; keeping service order")
    return _respond({"payment_id": payment_id, "events": events}, missing, "timeline")


def parse_expand(values: list[str]) -> list[str]:
    wanted = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in EXPANSIONS]
    if unknown:
        raise ValidationFailed(f"expand accepts {', '.join(EXPANSIONS)}; not {', '.join(unknown)}.",
                               errors=[{"pointer": "/query/expand", "detail": f"unknown expansion {u}",
                                        "code": "unknown_expansion"} for u in unknown])
    return list(dict.fromkeys(wanted))


async def payment_with_expansions(gateway: Gateway, caller: Caller, payment_id: str, expand: list[str]) -> Response:
    """The payment with its approval and ledger hold embedded, each as its own service
    represents it (GET /v1/approvals/{approval_id}, GET /v1/ledger/holds/{hold_id}); an
    id the payment does not have yet embeds null."""
    headers = gateway.internal_headers(caller)
    payment = await _outcome(_get(gateway, "payments", f"/v1/payments/{quote(payment_id, safe='')}", headers))
    if isinstance(payment, _Failed):
        raise payment.problem
    if payment[0] != 200 or not isinstance(payment[1], dict):
        return _upstream_answer(payment)
    body = dict(payment[1])
    wanted = []
    for name in expand:
        service, _, field, template = EXPANSIONS[name]
        reference = body.get(field)
        if reference:
            wanted.append((name, service, template.format(quote(str(reference), safe=""))))
        else:
            body[name] = None
    outcomes = await asyncio.gather(*(_get(gateway, service, path, headers) for _, service, path in wanted),
                                    return_exceptions=True)
    missing: list[MissingPart] = []
    for (name, service, _), outcome in zip(wanted, outcomes):
        if isinstance(outcome, BaseException) or outcome[0] != 200 or not isinstance(outcome[1], dict):
            body[name] = None
            missing.append(_problem_of(service, outcome))
        else:
            body[name] = outcome[1]
    return _respond(body, missing, "payment_expand")


async def _outcome(call):
    try:
        return await call
    except _Failed as failed:
        return failed
