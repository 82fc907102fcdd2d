"""What every console page shares: templates, the signed-in principal, forms with CSRF
tokens, security headers, and problem pages instead of stack traces.

    ConsoleRoute      any DomainError → an HTML problem page with its status, title,
                      detail and request id; anything unexpected → a 500 page (logged with
                      its traceback, which never reaches the browser); no session → 303
                      to the sign-in page (401 for background polls)
    signed_in()       the session cookie → Console (session + ConsoleApi acting as its key)
    read_form()       url-encoded body (small, bounded), Origin and CSRF checked

Pages are server-rendered Jinja2 with autoescaping; scripts and styles are files under
/console/static (the Content-Security-Policy allows nothing inline and nothing remote).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from opentelemetry import trace
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.console.client import ConsoleApi
from gateway.console.sessions import SESSION_COOKIE, ConsoleSession, SessionEnded, tokens_match
from shared import context
from shared.errors import DomainError, Forbidden
from shared.money import format_minor

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
MAX_FORM_BYTES = 16 * 1024
FINAL_PAYMENT_STATUSES = frozenset({"settled", "failed", "rejected", "cancelled", "refunded"})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class SignInRequired(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CsrfRefused(Forbidden):
    code, title = "csrf_refused", "Form expired"


@dataclass(frozen=True)
class Console:
    """The signed-in person: their session and the services as their key sees them."""

    session: ConsoleSession
    api: ConsoleApi

    @property
    def principal(self) -> str:
        return self.session.key.principal

    @property
    def tenant(self) -> str:
        return self.session.key.tenant_id


# --- rendering ---------------------------------------------------------------------------


def _money(amount: Any, currency: Any) -> str:
    """12345, "EUR" -> "123.45 EUR" with thousands grouped, for people (not machines)."""
    if not isinstance(amount, int) or not isinstance(currency, str):
        return "—"
    try:
        plain = format_minor(amount, currency)
    except (ValueError, TypeError):
        return f"{amount} {currency} (minor units)"
    sign, plain = ("-", plain[1:]) if plain.startswith("-") else ("", plain)
    whole, _, fraction = plain.partition(".")
    return f"{sign}{int(whole):,}{'.' + fraction if fraction else ''} {currency}"


def parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _when(value: Any) -> str:
    parsed = parse_time(value)
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if parsed else "—"


def _age(value: Any) -> str:
    parsed = parse_time(value)
    if parsed is None:
        return "—"
    seconds = max(0, int((datetime.now(timezone.utc) - parsed).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _number(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _short(value: Any, size: int = 8) -> str:
    return str(value)[:size] if value else "—"


def _words(value: Any) -> str:
    return str(value).replace("_", " ") if value else "—"


environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]),
                          trim_blocks=True, lstrip_blocks=True)
environment.filters.update(money=_money, when=_when, age=_age, duration=_duration, number=_number, short=_short,
                           words=_words)


def render(request: Request, template: str, *, console: Console | None = None, status: int = 200,
           **values: Any) -> HTMLResponse:
    page = environment.get_template(template).render(
        request=request, console=console, settings=request.app.state.settings,
        request_id=context.current().request_id, path=request.url.path, **values)
    return HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)


def problem_page(request: Request, *, status: int, title: str, detail: str, code: str) -> HTMLResponse:
    # Signed in (the failure came after signed_in()): keep the navigation on the page.
    console = getattr(request.state, "console", None)
    return render(request, "problem.html", console=console, status=status, title=title, detail=detail, code=code)


# --- the route class ---------------------------------------------------------------------


class ConsoleRoute(APIRoute):
    """Turns every failure of a console page into a page a person can read."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired as exc:
                if request.headers.get("x-console-poll"):
                    return Response(status_code=401, headers={"Cache-Control": "no-store"})
                target = request.url.path if request.method == "GET" else "/console/"
                return RedirectResponse(f"/console/sign-in?next={quote(target)}&reason={exc.reason}", 303)
            except DomainError as exc:
                return problem_page(request, status=exc.status, title=exc.title, detail=exc.detail, code=exc.code)
            except RequestValidationError:
                return problem_page(request, status=404, title="Not found", code="not_found",
                                    detail="This address does not name anything the console shows.")
            except StarletteHTTPException as exc:
                return problem_page(request, status=exc.status_code, title="Request failed", code="http_error",
                                    detail=str(exc.detail))
            except Exception as exc:  # the traceback goes to the log, never to the page
                log.error("console page %s failed", request.url.path, exc_info=exc)
                return problem_page(request, status=500, title="Something went wrong", code="internal_error",
                                    detail="The page could not be built. The request id below finds the details "
                                           "in the gateway's log.")

        return guarded


# --- who is signed in --------------------------------------------------------------------


async def signed_in(request: Request) -> Console:
    """FastAPI dependency: the signed-in person, or SignInRequired."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 100:
        raise SignInRequired("signed_out")
    state = request.app.state
    try:
        session = await state.console_sessions.load(token, touch=not request.headers.get("x-console-poll"))
    except SessionEnded as ended:
        raise SignInRequired(ended.reason) from None
    key = session.key
    context.bind(tenant_id=key.tenant_id, principal=key.principal, scopes=key.scopes, actor=f"user:{key.principal}")
    span = trace.get_current_span()
    span.set_attribute("clearhouse.tenant_id", key.tenant_id)
    span.set_attribute("clearhouse.principal", key.principal)
    span.set_attribute("clearhouse.api_key_id", key.key_id)
    request.state.console = Console(session=session, api=ConsoleApi(state.gateway, key))
    return request.state.console


# --- forms -------------------------------------------------------------------------------

_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{16,64}")


def same_origin(request: Request) -> bool:
    """A browser sends Origin on every POST; when it is there it must be this console.
    (SameSite=Strict already keeps the cookie off cross-site requests: defence in depth.)"""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


async def read_form(request: Request, *, csrf: str) -> dict[str, str]:
    """The url-encoded form of a POST whose CSRF token matches `csrf`."""
    if not same_origin(request):
        raise CsrfRefused("This form was sent from another site.")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_FORM_BYTES):
        raise CsrfRefused("The form is larger than the console accepts.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise CsrfRefused("The form is larger than the console accepts.")
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise CsrfRefused("The console only accepts its own forms.")
    try:
        fields = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20))
    except (UnicodeDecodeError, ValueError):
        raise CsrfRefused("The form could not be read.") from None
    if not tokens_match(fields.get("csrf_token"), csrf):
        raise CsrfRefused("The form expired or did not come from this console; reload the page and try again.")
    return fields


def idempotency_key(fields: dict[str, str]) -> str:
    """The form's own Idempotency-Key: a double-submitted form is the same request."""
    key = fields.get("idempotency_key", "")
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise CsrfRefused("The form is incomplete; reload the page and try again.")
    return key


def elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
