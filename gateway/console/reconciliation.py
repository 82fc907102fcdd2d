"""Reconciliation: runs with their progress, open breaks by type and age, and resolving
a break (or matching it by hand) with a reason.

    GET  /console/reconciliation                     runs, the open-break matrix, the breaks
    GET  /console/reconciliation/runs                the runs section alone, for the poll
                                                     while a run is queued or running
    POST /console/reconciliation/breaks/{id}/resolve ─▶ POST /v1/reconciliation/breaks/{id}/resolve
    POST /console/reconciliation/runs                ─▶ POST /v1/reconciliation/runs (run a
                                                     statement again, e.g. after a correction)

Every action goes through the reconciliation service as the principal, so its audit
(`resolved_by`, the break.resolved event's actor) names the person.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from gateway.console.client import path
from gateway.console.web import (
    SECURITY_HEADERS, Console, ConsoleRoute, environment, idempotency_key, read_form, render, signed_in,
)

router = APIRouter(route_class=ConsoleRoute)
ConsoleDep = Annotated[Console, Depends(signed_in)]
BreakId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
BREAK_TYPES = ("missing_in_statement", "missing_in_ledger", "missing_in_payments", "amount_mismatch",
               "currency_mismatch", "duplicate")
AGE_BUCKETS = ("0d", "1-3d", "4-7d", "8-30d", ">30d")
RESOLUTIONS = ("accepted", "written_off", "corrected_upstream", "false_positive", "manual_match")
STAGES = ("claimed", "keyed", "open_targets", "one_to_many", "fuzzy", "breaks", "done")
ACTIVE_RUN = frozenset({"queued", "running"})


def progress(run: dict) -> int:
    """Percent done, from the stage a run reports (a run's passes are its progress)."""
    if run.get("status") in ("completed", "failed"):
        return 100
    stage = run.get("stage")
    return int(100 * STAGES.index(stage) / (len(STAGES) - 1)) if stage in STAGES else 0


async def _runs(console: Console) -> dict:
    answer = await console.api.get("/v1/reconciliation/runs", limit=20)
    runs = answer.body.get("data", []) if answer.ok else []
    for run in runs:
        run["progress"] = progress(run)
        run["form_key"] = uuid.uuid4().hex
    return {"runs": runs, "runs_problem": None if answer.ok else answer.problem,
            "runs_active": any(r.get("status") in ACTIVE_RUN for r in runs)}


async def _page(console: Console, break_type: str | None) -> dict:
    if not console.api.may("reconciliation:read"):
        return {"missing_scope": "reconciliation:read", "runs": [], "breaks": [], "resolved": [], "matrix": {}}
    runs, open_breaks, resolved = await asyncio.gather(
        _runs(console),
        console.api.get("/v1/reconciliation/breaks", status="open", limit=1000),
        console.api.get("/v1/reconciliation/breaks", status="resolved", limit=1000))
    breaks = open_breaks.body.get("data", []) if open_breaks.ok else []
    matrix = Counter((b.get("type"), b.get("ageing_bucket")) for b in breaks)
    shown = [b for b in breaks if break_type in (None, b.get("type"))]
    for b in shown:
        b["form_key"] = uuid.uuid4().hex
    # The API lists oldest first; the most recent decisions are what a reviewer looks for.
    recent = sorted(resolved.body.get("data", []) if resolved.ok else [],
                    key=lambda b: b.get("resolved_at") or "", reverse=True)[:20]
    return {**runs, "breaks": shown, "open_total": len(breaks), "matrix": matrix, "resolved": recent,
            "more_breaks": bool(open_breaks.ok and open_breaks.body.get("next_cursor")),
            "breaks_problem": None if open_breaks.ok else open_breaks.problem}


def _render(request: Request, console: Console, data: dict, *, break_type: str | None, status: int = 200, **extra):
    return render(request, "reconciliation.html", console=console, status=status, break_types=BREAK_TYPES,
                  age_buckets=AGE_BUCKETS, resolutions=RESOLUTIONS, chosen_type=break_type, **data, **extra)


@router.get("/console/reconciliation", include_in_schema=False)
async def reconciliation_page(request: Request, console: ConsoleDep,
                              type: Annotated[str | None, Query(max_length=40)] = None,  # noqa: A002
                              resolved: Annotated[str | None, Query(max_length=64)] = None,
                              rerun: Annotated[str | None, Query(max_length=64)] = None):
    break_type = type if type in BREAK_TYPES else None
    notice = None
    if resolved:
        notice = "Break resolved. It is recorded with your name and reason."
    elif rerun:
        notice = "Run queued. Its progress is shown below."
    return _render(request, console, await _page(console, break_type), break_type=break_type, notice=notice)


@router.get("/console/reconciliation/runs", include_in_schema=False)
async def runs_section(request: Request, console: ConsoleDep):
    data = await _runs(console)
    body = environment.get_template("_runs.html").render(console=console, **data)
    return HTMLResponse(body, headers={**SECURITY_HEADERS, "X-Runs-Active": "1" if data["runs_active"] else "0"})


@router.post("/console/reconciliation/breaks/{break_id}/resolve", include_in_schema=False)
async def resolve(request: Request, break_id: BreakId, console: ConsoleDep):
    fields = await read_form(request, csrf=console.session.csrf_token)
    resolution = fields.get("resolution")
    reason = fields.get("reason", "").strip()
    body: dict = {"resolution": resolution, "reason": reason[:500]}
    error = None
    if resolution not in RESOLUTIONS:
        error = {"code": "validation_error", "detail": "Choose a resolution."}
    elif not reason:
        error = {"code": "validation_error", "detail": "Give a reason: it is recorded with the resolution."}
    elif resolution == "manual_match":
        target, line = fields.get("target_id", "").strip(), fields.get("line_no", "").strip()
        if bool(target) == bool(line):
            error = {"code": "validation_error",
                     "detail": "A manual match names either the payment id (for a statement line) or the "
                               "statement line number (for a payment), not both."}
        elif line and not line.isdigit():
            error = {"code": "validation_error", "detail": "The statement line number is a whole number."}
        else:
            body["match"] = {"target_id": target} if target else {"line_no": int(line)}
    if error is None:
        answer = await console.api.post(path("/v1/reconciliation/breaks/{}/resolve", break_id), body,
                                        idempotency_key=idempotency_key(fields))
        if answer.ok:
            return RedirectResponse(f"/console/reconciliation?resolved={break_id}", status_code=303)
        error = answer.problem
    status = error.get("status") if isinstance(error.get("status"), int) else 422
    return _render(request, console, await _page(console, None), break_type=None, status=status, error=error,
                   failed_id=break_id)


@router.post("/console/reconciliation/runs", include_in_schema=False)
async def rerun(request: Request, console: ConsoleDep):
    fields = await read_form(request, csrf=console.session.csrf_token)
    statement_id = fields.get("statement_id", "").strip()[:64]
    answer = await console.api.post("/v1/reconciliation/runs", {"statement_id": statement_id},
                                    idempotency_key=idempotency_key(fields))
    if answer.ok:
        return RedirectResponse(f"/console/reconciliation?rerun={answer.body.get('id', '')}", status_code=303)
    error = answer.problem
    status = error.get("status") if isinstance(error.get("status"), int) else 422
    return _render(request, console, await _page(console, None), break_type=None, status=status, error=error)
