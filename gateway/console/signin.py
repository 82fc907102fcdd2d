"""Signing in and out of the console.

    GET  /console/sign-in    the form (a double-submit CSRF cookie: there is no session yet)
    POST /console/sign-in    API key ─▶ KeyStore.verify ─▶ session cookie ─▶ 303 to `next`
    POST /console/sign-out   ends the session (CSRF-checked) and clears the cookie

The API key travels once, in the form body, and is never stored, logged or echoed back;
a failed sign-in says only that the key was not accepted (or revoked), as the API does.
`next` is only ever a path inside /console, so the form cannot be used to redirect away.
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse

from gateway.console.sessions import COOKIE_PATH, SESSION_COOKIE, SIGN_IN_COOKIE
from gateway.console.web import Console, ConsoleRoute, CsrfRefused, read_form, render, signed_in
from gateway.errors import ApiKeyRevoked, InvalidApiKey
from gateway.proxy import AUTH_REFUSALS

router = APIRouter(route_class=ConsoleRoute)

_NEXT = re.compile(r"/console(/[A-Za-z0-9._~%/-]*)?")
MESSAGES = {
    "signed_out": "You are signed out.",
    "expired": "Your session expired. Sign in again to continue.",
    "key_revoked": "Your session ended because the API key it was opened with has been revoked.",
    "replaced": "You signed in again elsewhere in this browser.",
    "unknown": "Sign in to continue.",
}


def safe_next(value: str | None) -> str:
    # No "//" (another host) and no dot segments (a browser would resolve them out of /console).
    if value and _NEXT.fullmatch(value) and "//" not in value and "/." not in value and "/console/sign-" not in value:
        return value
    return "/console/"


def cookie_secure(request: Request) -> bool:
    configured = request.app.state.settings.console_cookie_secure
    return configured if configured is not None else request.url.scheme == "https"


def _form(request: Request, *, next_path: str, message: str | None = None, error: str | None = None,
          status: int = 200):
    csrf = secrets.token_urlsafe(24)
    response = render(request, "sign_in.html", status=status, csrf_token=csrf, next_path=next_path, message=message,
                      error=error)
    response.set_cookie(SIGN_IN_COOKIE, csrf, max_age=3600, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=cookie_secure(request))
    return response


@router.get("/console/sign-in", include_in_schema=False)
async def sign_in_page(request: Request, next: Annotated[str | None, Query(max_length=300)] = None,  # noqa: A002
                       reason: Annotated[str | None, Query(max_length=30)] = None):
    return _form(request, next_path=safe_next(next), message=MESSAGES.get(reason or ""))


@router.post("/console/sign-in", include_in_schema=False)
async def sign_in(request: Request):
    expected = request.cookies.get(SIGN_IN_COOKIE)
    if not expected:
        raise CsrfRefused("The sign-in form expired (or cookies are blocked); reload the page and try again.")
    fields = await read_form(request, csrf=expected)
    next_path = safe_next(fields.get("next"))
    presented = fields.get("api_key", "").strip()
    if not presented:
        return _form(request, next_path=next_path, error="Enter your API key.", status=422)
    try:
        key = await request.app.state.gateway.keys.verify(presented)
    except (InvalidApiKey, ApiKeyRevoked) as refused:
        AUTH_REFUSALS.labels(refused.code).inc()
        error = ("This API key has been revoked." if isinstance(refused, ApiKeyRevoked)
                 else "This API key was not accepted. Check that you pasted the whole key.")
        return _form(request, next_path=next_path, error=error, status=401)
    token = await request.app.state.console_sessions.open(
        key, user_agent=request.headers.get("user-agent"), replacing=request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse(next_path, status_code=303)
    # No Max-Age: the cookie ends with the browser; the server's expiry bounds it anyway.
    response.set_cookie(SESSION_COOKIE, token, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=cookie_secure(request))
    response.delete_cookie(SIGN_IN_COOKIE, path=COOKIE_PATH)
    return response


@router.post("/console/sign-out", include_in_schema=False)
async def sign_out(request: Request, console: Annotated[Console, Depends(signed_in)]):
    await read_form(request, csrf=console.session.csrf_token)
    await request.app.state.console_sessions.end(request.cookies[SESSION_COOKIE], reason="signed_out")
    response = RedirectResponse("/console/sign-in?reason=signed_out", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict",
                           secure=cookie_secure(request))
    return response
