"""Payments: find one, see its status and its history across every service.

    GET /console/payments                        recent payments (filter by status), search by id
    GET /console/payments/{id}                   status, amounts, masked payee, the composed
                                                 timeline (who, what, when, why) with trace ids
    GET /console/payments/{id}/timeline          the timeline section alone, for the page's poll
                                                 while the payment is not final

Each trace id is shown with the command that follows it (`clearhouse trace <id>`) and, when
CONSOLE_TRACE_URL is set, a link to that trace in the tracing UI.
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from gateway.console.client import path
from gateway.console.web import (
    FINAL_PAYMENT_STATUSES, SECURITY_HEADERS, Console, ConsoleRoute, environment, render, signed_in,
)
from shared.errors import NotFound

router = APIRouter(route_class=ConsoleRoute)
ConsoleDep = Annotated[Console, Depends(signed_in)]
PaymentId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
STATUSES = ("pending_approval", "approved", "submitted", "settled", "failed", "rejected", "cancelled")
_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


def trace_link(request: Request, trace_id: str | None) -> str | None:
    template = request.app.state.settings.console_trace_url
    if not template or not trace_id or not re.fullmatch(r"[0-9a-f]{32}", trace_id):
        return None
    return template.replace("{trace_id}", trace_id)


async def _timeline(console: Console, payment_id: str) -> dict:
    payment, timeline = await asyncio.gather(console.api.get(path("/v1/payments/{}", payment_id)),
                                             console.api.timeline(payment_id))
    if payment.status == 404:
        raise NotFound("No payment with this id in your tenant.")
    if not payment.ok:
        return {"payment": None, "problem": payment.problem, "events": [], "final": True}
    body = timeline.body if isinstance(timeline.body, dict) else {}
    return {"payment": payment.body, "events": body.get("events", []), "missing": body.get("missing", []),
            "problem": None if timeline.ok else timeline.problem,
            "final": payment.body.get("status") in FINAL_PAYMENT_STATUSES}


@router.get("/console/payments", include_in_schema=False)
async def payments_page(request: Request, console: ConsoleDep,
                        id: Annotated[str | None, Query(max_length=100)] = None,  # noqa: A002
                        status: Annotated[str | None, Query(max_length=30)] = None):
    if id is not None:
        wanted = id.strip()
        if _ID.fullmatch(wanted):
            return RedirectResponse(f"/console/payments/{wanted}", status_code=303)
        return render(request, "payments.html", console=console, status=422, payments=[], statuses=STATUSES,
                      chosen=None, error="A payment id is letters, digits and dashes (e.g. a UUID).")
    chosen = status if status in STATUSES else None
    answer = await console.api.get("/v1/payments", status=chosen, limit=50)
    return render(request, "payments.html", console=console, statuses=STATUSES, chosen=chosen,
                  payments=answer.body.get("data", []) if answer.ok else [],
                  problem=None if answer.ok else answer.problem)


@router.get("/console/payments/{payment_id}", include_in_schema=False)
async def payment_page(request: Request, payment_id: PaymentId, console: ConsoleDep):
    data = await _timeline(console, payment_id)
    return render(request, "payment.html", console=console, payment_id=payment_id,
                  trace_link=lambda t: trace_link(request, t), **data)


@router.get("/console/payments/{payment_id}/timeline", include_in_schema=False)
async def payment_timeline(request: Request, payment_id: PaymentId, console: ConsoleDep):
    data = await _timeline(console, payment_id)
    body = environment.get_template("_timeline.html").render(
        console=console, payment_id=payment_id, trace_link=lambda t: trace_link(request, t), **data)
    return HTMLResponse(body, headers={**SECURITY_HEADERS, "X-Payment-Final": "1" if data["final"] else "0"})
