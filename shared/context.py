"""Who is acting and on whose behalf, carried through one request or one consumed message.

Set once at the edge (HTTP middleware, consumer loop) and read wherever an event or a log
line needs it. It never holds secrets: only ids.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RequestContext:
    tenant_id: str | None = None
    principal: str | None = None
    scopes: frozenset[str] = frozenset()
    actor: str | None = None  # "user:<id>", "service:<name>", "job:<name>", "webhook:<source>", "system:<rule>"
    correlation_id: str | None = None
    causation_id: str | None = None
    request_id: str | None = None


_current: contextvars.ContextVar[RequestContext] = contextvars.ContextVar("clearhouse_ctx", default=RequestContext())


def current() -> RequestContext:
    return _current.get()


def start(**fields) -> contextvars.Token:
    """Begin a fresh context for a new request or message: nothing carries over from
    whatever ran before in this task. Returns a token for `reset`."""
    return _current.set(RequestContext(**fields))


def bind(**changes) -> contextvars.Token:
    """Replace fields of the current context; returns a token for `reset`."""
    return _current.set(replace(_current.get(), **changes))


def reset(token: contextvars.Token) -> None:
    _current.reset(token)
