"""The approvals inbox: what waits for this person's decision, and the decision itself.

    GET  /console/approvals                  pending requests, oldest first: amount, payee
                                             (masked, from payments), maker, age, policy rule
    GET  /console/approvals/rows             the table body alone, for the page's poll
                                             (ETag; 304 when nothing changed)
    POST /console/approvals/{id}/decisions   approve / reject with a reason ─▶
                                             POST /v1/approvals/{id}/decisions as the principal

The page marks a request the person may not decide (their own, one they already
approved, a missing scope) and says why, but the approvals service stays the judge:
a forced submission is refused there (403 maker_cannot_decide) and shown as such.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import RedirectResponse

from gateway.console.client import Answer, path
from gateway.console.web import Console, ConsoleRoute, environment, idempotency_key, read_form, render, signed_in

router = APIRouter(route_class=ConsoleRoute)
ConsoleDep = Annotated[Console, Depends(signed_in)]
ApprovalId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
_OUTCOMES = {"approve": "approved", "reject": "rejected"}


def blocked_reason(console: Console, approval: dict) -> str | None:
    """Why this person cannot decide this request, or None. A hint for the page only:
    the approvals service decides (and refuses) on its own."""
    me = console.principal
    if me in (approval.get("maker"), approval.get("requested_by")):
        return "You made this request: another approver must decide it."
    if any(d.get("principal") == me for d in approval.get("decisions") or []):
        return "You have already decided this request."
    if not console.api.may("approvals:decide"):
        return "Your API key does not have the approvals:decide scope."
    eligible = approval.get("approver_principals") or []
    if eligible and me not in eligible:
        return "This request's policy names other approvers."
    missing = [s for s in approval.get("approver_scopes") or [] if not console.api.may(s)]
    if missing:
        return f"This request's policy needs the scope {', '.join(missing)}."
    return None


async def inbox(console: Console) -> dict:
    """Pending approvals joined with their payments (for the masked payee and reference)."""
    if not console.api.may("approvals:read"):
        return {"rows": [], "missing_scope": "approvals:read"}
    calls = [console.api.get("/v1/approvals", status="pending", limit=100)]
    if console.api.may("payments:read"):
        calls.append(console.api.get("/v1/payments", status="pending_approval", limit=100))
    answers: list[Answer] = await asyncio.gather(*calls)
    approvals = answers[0]
    if not approvals.ok:
        return {"rows": [], "problem": approvals.problem}
    payments = {}
    if len(answers) > 1 and answers[1].ok:
        payments = {p["id"]: p for p in answers[1].body.get("data", [])}
    rows = []
    for approval in sorted(approvals.body.get("data", []), key=lambda a: a.get("created_at") or ""):
        payment = payments.get(approval.get("payment_id") or "")
        rows.append({"approval": approval, "payment": payment, "blocked": blocked_reason(console, approval),
                     "form_key": uuid.uuid4().hex})
    return {"rows": rows, "payments_visible": len(answers) > 1}


def _etag(console: Console, rows: list[dict]) -> str:
    state = "|".join(f"{r['approval']['id']}:{r['approval'].get('status')}:{r['approval'].get('approvals')}:"
                     f"{r['blocked']}" for r in rows)
    return '"' + hashlib.sha256(f"{console.principal}|{state}".encode()).hexdigest()[:20] + '"'


@router.get("/console/approvals", include_in_schema=False)
async def approvals_page(request: Request, console: ConsoleDep,
                         decided: Annotated[str | None, Query(max_length=64)] = None,
                         outcome: Annotated[str | None, Query(max_length=20)] = None):
    data = await inbox(console)
    notice = None
    if decided and outcome in ("granted", "rejected", "pending"):
        notice = {"granted": "Approved: the request is granted.", "rejected": "Rejected: the request is closed.",
                  "pending": "Your approval is recorded; the request waits for more approvers."}[outcome]
    return render(request, "approvals.html", console=console, notice=notice, etag=_etag(console, data["rows"]),
                  **data)


@router.get("/console/approvals/rows", include_in_schema=False)
async def approval_rows(request: Request, console: ConsoleDep):
    data = await inbox(console)
    etag = _etag(console, data["rows"])
    headers = {"ETag": etag, "Cache-Control": "no-store"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    body = environment.get_template("_approval_rows.html").render(console=console, **data)
    return Response(body, media_type="text/html", headers={**headers, "X-Inbox-Count": str(len(data["rows"]))})


@router.post("/console/approvals/{approval_id}/decisions", include_in_schema=False)
async def decide(request: Request, approval_id: ApprovalId, console: ConsoleDep):
    fields = await read_form(request, csrf=console.session.csrf_token)
    decision = fields.get("decision")
    reason = fields.get("reason", "").strip()
    error = None
    if decision not in _OUTCOMES:
        error = {"code": "validation_error", "detail": "Choose Approve or Reject."}
    elif not reason:
        error = {"code": "validation_error", "detail": "Give a reason: it is recorded with your decision."}
    else:
        answer = await console.api.post(path("/v1/approvals/{}/decisions", approval_id),
                                        {"decision": decision, "reason": reason[:500]},
                                        idempotency_key=idempotency_key(fields))
        if answer.ok:
            status = (answer.body or {}).get("status") or (answer.body or {}).get("approval", {}).get("status")
            return RedirectResponse(f"/console/approvals?decided={approval_id}&outcome={status or 'pending'}", 303)
        error = answer.problem
    data = await inbox(console)
    status = error.get("status") if isinstance(error.get("status"), int) else 422
    return render(request, "approvals.html", console=console, status=status, error=error,
                  failed_id=approval_id, etag=_etag(console, data["rows"]), **data)
