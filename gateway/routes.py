"""Which service owns a public path, and which scope a request on it needs.

    /v1/payments...        payments        GET payments:read      other methods payments:write
    /v1/payments/webhooks/ payments        POST public (the processor signs; payments verifies the HMAC)
    /v1/approvals...       approvals       GET approvals:read
        POST /v1/approvals                      approvals:request  (file a generic approval request)
        PUT  /v1/approvals/policies/...         approvals:admin    (change a tenant's policy)
        other methods, e.g. POST .../{id}/decisions  approvals:decide
    /v1/ledger/...         ledger          GET ledger:read        other methods ledger:write
    /v1/reconciliation/... reconciliation  GET reconciliation:read  other methods reconciliation:write

The gateway's scope is the coarse gate; a service may check more (who may decide which
approval). Paths with empty, `.` or `..` segments are refused here so that what the scope
was checked against is exactly what the service receives.
"""

from __future__ import annotations

from dataclasses import dataclass

READ_METHODS = frozenset({"GET", "HEAD"})
PROXIED_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
SERVICES = ("payments", "approvals", "ledger", "reconciliation")
_WRITE_SCOPE = {"payments": "payments:write", "approvals": "approvals:decide", "ledger": "ledger:write",
                "reconciliation": "reconciliation:write"}
WEBHOOKS_PREFIX = "/v1/payments/webhooks/"
STATEMENTS_PATH = "/v1/reconciliation/statements"


@dataclass(frozen=True)
class Route:
    service: str
    scope: str | None  # None: public, no API key (processor webhooks)
    large_body: bool = False  # statement files may exceed the default body limit


def resolve(method: str, path: str) -> Route | None:
    """The route for a request, or None when no service owns the path."""
    parts = path.split("/")  # "", "v1", "<service>", ...
    if len(parts) < 3 or parts[1] != "v1" or parts[2] not in SERVICES:
        return None
    if any(segment in ("", ".", "..") for segment in parts[3:-1]) or parts[-1] in (".", ".."):
        return None
    service = parts[2]
    if method == "POST" and path.startswith(WEBHOOKS_PREFIX):
        return Route(service, None)
    if method in READ_METHODS:
        return Route(service, f"{service}:read")
    return Route(service, _write_scope(method, service, parts[3:]),
                 large_body=method == "POST" and path == STATEMENTS_PATH)


def _write_scope(method: str, service: str, rest: list[str]) -> str:
    if service == "approvals":
        if method == "POST" and rest in ([], [""]):
            return "approvals:request"
        if rest[:1] == ["policies"]:
            return "approvals:admin"
    return _WRITE_SCOPE[service]
