"""The operations console (issue 10): one web page for approvers, reconciliation analysts
and on-call engineers, served by the gateway under /console.

    /console/sign-in, /sign-out          signin.py      API key ─▶ server-side session
    /console/approvals                   approvals.py   the inbox; approve / reject
    /console/payments[/{id}]             payments.py    status, cross-service timeline, traces
    /console/reconciliation              reconciliation.py  runs, breaks, resolve / match
    /console/health                      below          outbox, lag, DLQ, errors per service
    /console/static/{file}               below          the one stylesheet, script and icon

Plain server-rendered HTML with a little JavaScript, no build step and nothing fetched from
elsewhere. Every action goes to the services through the same internal-token path as the
public API (client.py); the console holds no business rule of its own. None of these
routes is part of the public API document.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.console import approvals, payments, reconciliation, signin
from gateway.console.health import HealthMonitor
from gateway.console.sessions import SessionStore
from gateway.console.web import Console, ConsoleRoute, problem_page, render, signed_in
from gateway.settings import Settings
from shared.errors import Forbidden

STATIC = Path(__file__).parent / "static"
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}

router = APIRouter(route_class=ConsoleRoute)
ConsoleDep = Annotated[Console, Depends(signed_in)]


def _load_static() -> dict[str, tuple[bytes, str, str]]:
    files = {}
    for file in STATIC.iterdir():
        if file.suffix in _STATIC_TYPES:
            content = file.read_bytes()
            etag = '"' + hashlib.sha256(content).hexdigest()[:16] + '"'
            files[file.name] = (content, _STATIC_TYPES[file.suffix], etag)
    return files


_FILES = _load_static()


@router.get("/console", include_in_schema=False)
@router.get("/console/", include_in_schema=False)
async def home(console: ConsoleDep):
    return RedirectResponse("/console/approvals", status_code=303)


@router.get("/console/static/{name}", include_in_schema=False)
async def static(request: Request, name: str):
    found = _FILES.get(name)
    if found is None:
        return problem_page(request, status=404, title="Not found", code="not_found", detail="No such file.")
    content, media_type, etag = found
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)


@router.get("/console/health", include_in_schema=False)
async def health_page(request: Request, console: ConsoleDep):
    allowed = [t.strip() for t in request.app.state.settings.console_health_tenants.split(",") if t.strip()]
    if allowed and console.tenant not in allowed:
        raise Forbidden("Platform health is shown to the operations tenants only.")
    started = time.perf_counter()
    report = await request.app.state.console_health.report()
    return render(request, "health.html", console=console, report=report,
                  took_ms=(time.perf_counter() - started) * 1000)


@router.api_route("/console/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
async def not_found(request: Request, rest: str):
    return problem_page(request, status=404, title="Not found", code="not_found",
                        detail="The console has no page at this address.")


def install(app: FastAPI, *, engine: AsyncEngine, settings: Settings) -> HealthMonitor:
    """Adds the console's routes and state to the gateway app; returns what must be
    closed at shutdown."""
    app.state.console_sessions = SessionStore(engine, ttl_s=settings.console_session_ttl_s,
                                              idle_timeout_s=settings.console_idle_timeout_s)
    monitor = HealthMonitor(settings)
    app.state.console_health = monitor
    for module in (signin, approvals, payments, reconciliation):
        app.include_router(module.router)
    app.include_router(router)  # last: its catch-all answers what no other console route does
    return monitor
