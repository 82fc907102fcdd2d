"""The problems the gateway itself answers with (the services' own pass through as they
are). Each names what a client can do about it; none reveals why a key failed beyond
what its holder may know, nor anything about an upstream but its name.

    401 missing_api_key | invalid_api_key | api_key_revoked
    403 insufficient_scope (with `missing_scope`)
    413 payload_too_large            429 rate_limited (Retry-After, RateLimit-*)
    502 upstream_error               the upstream broke the exchange: outcome unknown
    503 upstream_unavailable          not sent (connection refused): safe to retry
    503 upstream_busy | auth_unavailable
    504 upstream_timeout              sent, no answer in time: retry with the same Idempotency-Key
"""

from __future__ import annotations

from shared.auth import InsufficientScope
from shared.errors import DomainError, NotFound, PayloadTooLarge, ServiceUnavailable, TooManyRequests, Unauthorized

__all__ = [
    "ApiKeyRevoked", "AuthUnavailable", "InsufficientScope", "InvalidApiKey", "MissingApiKey", "NotFound",
    "PayloadTooLarge", "RateLimited", "UpstreamBusy", "UpstreamError", "UpstreamTimeout", "UpstreamUnavailable",
]

_CHALLENGE = 'Bearer realm="clearhouse"'


class MissingApiKey(Unauthorized):
    code, title = "missing_api_key", "API key required"

    def __init__(self) -> None:
        super().__init__("Send your API key as `Authorization: Bearer <key>`.",
                         headers={"WWW-Authenticate": _CHALLENGE})


class InvalidApiKey(Unauthorized):
    code, title = "invalid_api_key", "Invalid API key"

    def __init__(self, detail: str = "The API key is not valid.") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'})


class ApiKeyRevoked(Unauthorized):
    code, title = "api_key_revoked", "API key revoked"

    def __init__(self) -> None:
        super().__init__("This API key has been revoked; use another key of this principal.",
                         headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'})


class AuthUnavailable(ServiceUnavailable):
    code, title = "auth_unavailable", "Authentication unavailable"


class RateLimited(TooManyRequests):
    code, title = "rate_limited", "Rate limit exceeded"


class UpstreamUnavailable(ServiceUnavailable):
    code, title = "upstream_unavailable", "Upstream unavailable"


class UpstreamBusy(ServiceUnavailable):
    code, title = "upstream_busy", "Upstream busy"


class UpstreamTimeout(DomainError):
    status, code, title = 504, "upstream_timeout", "Upstream timeout"


class UpstreamError(DomainError):
    status, code, title = 502, "upstream_error", "Upstream error"


# Gateway problems every proxied operation may answer, for the merged OpenAPI document.
GATEWAY_ERRORS = (MissingApiKey, InvalidApiKey, ApiKeyRevoked, InsufficientScope, PayloadTooLarge, RateLimited,
                  UpstreamError, UpstreamUnavailable, UpstreamBusy, AuthUnavailable, UpstreamTimeout)
