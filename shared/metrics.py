"""Prometheus metrics every Clearhouse process exports, declared once so dashboards and
alert rules can rely on the names.

Labels are bounded (service, route template, topic, consumer, event type): never ids or
amounts. A service's domain metrics live in the service (its `gauges.py`, or beside the
use case that counts) under the same `clearhouse_<service>_...` naming; gauges that need a
database query are refreshed by `refresh_periodically` in the consumer process, never per
request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest, make_wsgi_app

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter(
    "clearhouse_http_requests_total", "HTTP requests answered", ["service", "method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "clearhouse_http_request_duration_seconds", "HTTP request latency", ["service", "method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
IDEMPOTENT_REPLAYS = Counter(
    "clearhouse_idempotent_replays_total", "Requests answered from a stored idempotent response", ["service"]
)
IDEMPOTENCY_CONFLICTS = Counter(
    "clearhouse_idempotency_conflicts_total", "Idempotency-Key reuse refused", ["service", "reason"]
)
OUTBOX_BACKLOG = Gauge("clearhouse_outbox_backlog", "Events committed but not yet published", ["service"])
OUTBOX_OLDEST_AGE = Gauge(
    "clearhouse_outbox_oldest_unpublished_age_seconds", "Age of the oldest unpublished event", ["service"]
)
# By event type too (a bounded set, declared in code): `payment.settled.v1` published per
# second is payments reaching settled per second, for every service alike.
EVENTS_PUBLISHED = Counter("clearhouse_events_published_total", "Events published by the relay", ["service", "type"])
RELAY_PUBLISH_ERRORS = Counter("clearhouse_relay_publish_errors_total", "Failed publish attempts", ["service"])
RELAY_ACTIVE = Gauge("clearhouse_relay_active", "1 when this relay replica holds the lease", ["service"])
RELAY_LATENCY = Histogram(
    "clearhouse_relay_commit_to_ack_seconds", "Time from event commit to broker acknowledgement", ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
)
CONSUMER_PROCESSED = Counter(
    "clearhouse_consumer_messages_total", "Messages handled by a consumer, by outcome",
    ["consumer", "topic", "outcome"],
)
CONSUMER_LAG = Gauge("clearhouse_consumer_lag", "Messages behind the partition end", ["consumer", "topic", "partition"])
CONSUMER_FAILURES = Counter("clearhouse_consumer_failures_total", "Handler attempts that raised", ["consumer", "topic"])
DLQ_MESSAGES = Counter("clearhouse_dlq_messages_total", "Messages sent to a dead-letter topic", ["consumer", "topic"])
DOMAIN_GAUGE_REFRESHES = Counter(
    "clearhouse_domain_gauge_refreshes_total", "Rounds refreshing a service's domain gauges, by outcome",
    ["service", "outcome"],
)


def metrics_payload() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST


def serve_metrics(port: int, addr: str | None = None, health=None) -> None:
    """For processes without an HTTP API (relay, consumer): `/metrics`, and `/healthz` and
    `/readyz` answered by `health` (a `shared.health.WorkerHealth`) when given. Binds where
    an API would (`HOST`, loopback unless set): in a container HOST is 0.0.0.0, so that
    Prometheus and the kubelet's probes, which come from outside the container, reach it."""
    exposition = make_wsgi_app()

    def app(environ, start_response):
        answer = health.answer(environ.get("PATH_INFO", "")) if health is not None else None
        if answer is None:
            return exposition(environ, start_response)
        status, content_type, body = answer
        start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                       [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    server = make_server(addr or os.environ.get("HOST", "127.0.0.1"), port, app, _ThreadingServer, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds the process open at exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 (the stdlib's signature)
        """Scrapes and probes every few seconds would drown the JSON logs."""


async def refresh_periodically(refresh: Callable[[], Awaitable[None]], *, service: str, interval_s: float,
                               stop: asyncio.Event) -> None:
    """Run `refresh` (a service's gauge queries) now and every `interval_s` until `stop`.
    A failed round keeps the last values and is counted; it never stops the process."""
    while not stop.is_set():
        try:
            await refresh()
            DOMAIN_GAUGE_REFRESHES.labels(service, "ok").inc()
        except Exception as exc:
            DOMAIN_GAUGE_REFRESHES.labels(service, "error").inc()
            log.warning("domain gauges of %s: refresh failed: %s", service, type(exc).__name__, exc_info=exc)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except asyncio.TimeoutError:
            pass
