"""The gateway's connections to the services: one pooled, keep-alive httpx client per
upstream for the life of the process, and one place that turns a failed exchange into
a problem that says which service failed and whether the request may have taken effect.

    connection refused / connect timeout   503 upstream_unavailable  not sent: safe to retry
    no free connection in the pool in time 503 upstream_busy         not sent: safe to retry
    too many requests already in flight    503 upstream_busy         not sent: safe to retry
    sent, no (complete) answer in time     504 upstream_timeout      outcome unknown
    connection broken mid-exchange         502 upstream_error        outcome unknown

The outgoing call is traced by the httpx instrumentation, so it carries `traceparent`
of the gateway's span. This module never creates a client per request and never retries
a request on its own: only the client knows whether a retry is safe (Idempotency-Key).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator

import httpx
from prometheus_client import Counter, Histogram

from gateway.errors import UpstreamBusy, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.settings import UPSTREAMS, Settings

log = logging.getLogger(__name__)
# Idle pooled connections to a service are dropped after this long, before uvicorn (which
# the services run with its default `timeout_keep_alive` of 5 s) closes them from its side:
# a connection the service closes just as the gateway reuses it breaks the request off
# (ReadError: a 502 for a POST that may have taken effect). It was 30 s, longer than the
# services keep a connection, so every connection idle for 5 s was exposed to that race.
UPSTREAM_KEEPALIVE_S = 4.0

# httpcore asks `import sniffio` every time it sets up a lock (several times per request);
# when sniffio is not installed that failed import scans sys.path each time, about 1.5 ms
# of CPU per proxied request on this machine. A None entry makes the import fail at once,
# and httpcore then assumes asyncio, which is what the gateway runs on. Installing sniffio
# (httpcore's usual companion) makes this a no-op.
try:
    import sniffio  # noqa: F401
except ImportError:
    sys.modules.setdefault("sniffio", None)

UPSTREAM_REQUESTS = Counter("clearhouse_gateway_upstream_requests_total", "Calls from the gateway to a service",
                            ["upstream", "outcome"])
UPSTREAM_LATENCY = Histogram(
    "clearhouse_gateway_upstream_duration_seconds", "Time to a service's response headers", ["upstream"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class Upstreams:
    """One httpx client per upstream, each with its own connection pool (its transport).

    The proxy path hands requests straight to the client's pooled transport: the client
    layers it skips (auth flows, redirects, cookie jars) do nothing for a proxy, and
    cost a measurable share of the gateway's CPU per request. The transport is still
    httpx's, so pooling, keep-alive and the OpenTelemetry instrumentation (which wraps
    the transport) are the same."""

    def __init__(self, settings: Settings) -> None:
        self.clients: dict[str, httpx.AsyncClient] = {}
        self._transports: dict[str, httpx.AsyncHTTPTransport] = {}
        self._origins: dict[str, tuple[str, str, int | None]] = {}
        self._timeouts: dict[str, dict[str, float]] = {}
        self._connect_timeout_s = settings.connect_timeout_s
        self._max_pending = settings.upstream_max_pending
        self._pending = dict.fromkeys(UPSTREAMS, 0)
        for service in UPSTREAMS:
            timeout = httpx.Timeout(settings.upstream_timeout(service),
                                    connect=min(settings.connect_timeout_s, settings.upstream_timeout(service)))
            transport = httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=settings.upstream_max_connections,
                                    max_keepalive_connections=settings.upstream_max_connections,
                                    keepalive_expiry=UPSTREAM_KEEPALIVE_S),
                trust_env=False,  # an HTTP(S)_PROXY in the environment must not reroute internal calls
            )
            self._transports[service] = transport
            self.clients[service] = httpx.AsyncClient(base_url=settings.upstream_url(service), timeout=timeout,
                                                      transport=transport, follow_redirects=False, trust_env=False)
            base = httpx.URL(settings.upstream_url(service))
            self._origins[service] = (base.scheme, base.host, base.port)
            self._timeouts[service] = timeout.as_dict()

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()  # closes its transport, the pool

    async def send(self, service: str, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send and return the response (headers read; the body too unless `stream`), or
        raise the problem that describes the failure."""
        if self._pending[service] >= self._max_pending:
            UPSTREAM_REQUESTS.labels(service, "shed").inc()
            raise UpstreamBusy(f"The gateway has {self._max_pending} requests in flight to the {service} service; "
                               f"nothing was sent. Retry shortly.", service=service, headers={"Retry-After": "1"})
        self._pending[service] += 1
        started = time.perf_counter()
        try:
            response = await self._transports[service].handle_async_request(request)
            if not stream:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        except httpx.HTTPError as exc:
            raise self.failure(service, exc) from None
        finally:
            self._pending[service] -= 1
        UPSTREAM_LATENCY.labels(service).observe(time.perf_counter() - started)
        UPSTREAM_REQUESTS.labels(service, "response").inc()
        return response

    def build(self, service: str, method: str, raw_path: bytes, *, headers: list[tuple[str, str]],
              content: bytes | AsyncIterator[bytes] | None = None, timeout: float | None = None) -> httpx.Request:
        scheme, host, port = self._origins[service]
        url = httpx.URL(scheme=scheme, host=host, port=port, raw_path=raw_path)
        if timeout is None:
            timeouts = self._timeouts[service]
        else:
            timeouts = httpx.Timeout(timeout, connect=min(timeout, self._connect_timeout_s)).as_dict()
        # The timeout extension is what httpcore enforces; without it a call could wait forever.
        return httpx.Request(method, url, headers=headers, content=content, extensions={"timeout": timeouts})

    def failure(self, service: str, exc: Exception):
        """The problem for a failed exchange with `service` (also used by composition)."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            outcome, problem = "unavailable", UpstreamUnavailable(
                f"The {service} service cannot be reached; nothing was sent to it. Retry shortly.", service=service,
                headers={"Retry-After": "1"})
        elif isinstance(exc, httpx.PoolTimeout):
            outcome, problem = "busy", UpstreamBusy(
                f"The gateway has no free connection to the {service} service; nothing was sent. Retry shortly.",
                service=service, headers={"Retry-After": "1"})
        elif isinstance(exc, httpx.TimeoutException):
            outcome, problem = "timeout", UpstreamTimeout(
                f"The {service} service did not answer in time. The request may have taken effect: retry with "
                f"the same Idempotency-Key.", service=service)
        else:
            outcome, problem = "error", UpstreamError(
                f"The exchange with the {service} service broke off. The request may have taken effect: retry "
                f"with the same Idempotency-Key.", service=service)
        UPSTREAM_REQUESTS.labels(service, outcome).inc()
        log.warning("upstream %s failed: %s (%s)", service, outcome, type(exc).__name__)
        return problem
