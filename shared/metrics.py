"""Prometheus metrics every Clearhouse process exports, declared once so dashboards and
alert rules can rely on the names.

Labels are bounded (service, route template, topic, consumer): never ids or amounts.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest, start_http_server

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
EVENTS_PUBLISHED = Counter("clearhouse_events_published_total", "Events published by the relay", ["service"])
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


def metrics_payload() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST


def serve_metrics(port: int, addr: str | None = None) -> None:
    """For processes without an HTTP API (relay, consumer). Binds where an API would
    (`HOST`, loopback unless set): in a container HOST is 0.0.0.0, so that Prometheus and
    the kubelet's liveness probe, which come from outside the container, can reach it."""
    start_http_server(port, addr=addr or os.environ.get("HOST", "127.0.0.1"))
