"""The Health page's numbers, read from each process's own Prometheus `/metrics` (the same
series the dashboards and alerts use, shared/metrics.py), never from the databases:

    api processes       clearhouse_http_requests_total{service,status}  → requests, 5xx, error ratio
    relay processes     clearhouse_outbox_backlog / ..._oldest_unpublished_age_seconds
    consumer processes  clearhouse_consumer_lag (summed per consumer and topic),
                        clearhouse_dlq_messages_total, clearhouse_consumer_failures_total

Rates need two samples: the previous scrape of each target is kept in memory, and the
page shows the 5xx rate over the time between the two (and the totals since the process
started). Targets are scraped concurrently with a short timeout; one that does not answer
is shown as down, never as zero. Only bounded labels are read; nothing here is per tenant.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import UPSTREAMS, Settings

SCRAPE_TIMEOUT_S = 2.0
SELF = "gateway"  # read in process: the gateway's own registry


@dataclass
class Sample:
    at: float
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class ProcessHealth:
    name: str
    url: str
    up: bool
    error: str | None = None
    scrape_ms: float = 0.0


@dataclass
class ServiceHealth:
    service: str
    requests: float = 0.0
    server_errors: float = 0.0
    error_rate_per_s: float | None = None  # 5xx per second over the last interval
    rate_window_s: float | None = None
    outbox_backlog: float | None = None
    outbox_oldest_age_s: float | None = None
    relay_publish_errors: float | None = None
    consumers: list[dict] = field(default_factory=list)  # {consumer, topic, lag, dlq, failures}

    @property
    def error_ratio(self) -> float | None:
        return self.server_errors / self.requests if self.requests else None


@dataclass
class HealthReport:
    processes: list[ProcessHealth]
    services: list[ServiceHealth]
    scraped_at: float


def parse_targets(settings: Settings) -> list[tuple[str, str]]:
    """(name, url) pairs: CONSOLE_METRICS_TARGETS, or each upstream's API /metrics."""
    targets = []
    for item in settings.console_metrics_targets.split(","):
        name, _, url = item.strip().partition("=")
        if name and url:
            targets.append((name.strip(), url.strip()))
    if not targets:
        targets = [(f"{s}-api", settings.upstream_url(s).rstrip("/") + "/metrics") for s in UPSTREAMS]
    return targets


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("clearhouse_"):
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


class HealthMonitor:
    def __init__(self, settings: Settings) -> None:
        self.targets = parse_targets(settings)
        self._previous: dict[str, Sample] = {}
        self._client = httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S, trust_env=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _scrape(self, name: str, url: str) -> tuple[ProcessHealth, Sample | None]:
        started = time.perf_counter()
        try:
            response = await self._client.get(url)
            response.raise_for_status()
            values = parse(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            return ProcessHealth(name, url, up=False, error=type(exc).__name__), None
        took = (time.perf_counter() - started) * 1000
        return ProcessHealth(name, url, up=True, scrape_ms=took), Sample(time.monotonic(), values)

    async def report(self) -> HealthReport:
        scraped = await asyncio.gather(*(self._scrape(name, url) for name, url in self.targets))
        own = Sample(time.monotonic(), parse(generate_latest(REGISTRY).decode()))
        processes = [process for process, _ in scraped]
        processes.insert(0, ProcessHealth(SELF, "(in process)", up=True))
        samples = {process.name: sample for process, sample in scraped if sample is not None}
        samples[SELF] = own
        services = summarise(samples, self._previous)
        self._previous.update(samples)
        return HealthReport(processes=processes, services=services, scraped_at=time.time())


def _label(labels: tuple[tuple[str, str], ...], name: str) -> str:
    return dict(labels).get(name, "")


def summarise(samples: dict[str, Sample], previous: dict[str, Sample]) -> list[ServiceHealth]:
    """Per service, from every process's sample (and the previous ones, for rates)."""
    by_service: dict[str, ServiceHealth] = {}

    def of(service: str) -> ServiceHealth:
        return by_service.setdefault(service, ServiceHealth(service))

    lag = defaultdict(float)
    dlq = defaultdict(float)
    failures = defaultdict(float)
    owners: dict[tuple[str, str], str] = {}
    for process, sample in samples.items():
        before = previous.get(process)
        errors_now = errors_then = 0.0
        for (metric, labels), value in sample.values.items():
            if metric == "clearhouse_http_requests_total":
                health = of(_label(labels, "service"))
                health.requests += value
                if _label(labels, "status").startswith("5"):
                    health.server_errors += value
                    errors_now += value
                    if before is not None:
                        errors_then += before.values.get((metric, labels), 0.0)
            elif metric == "clearhouse_outbox_backlog":
                health = of(_label(labels, "service"))
                health.outbox_backlog = (health.outbox_backlog or 0) + value
            elif metric == "clearhouse_outbox_oldest_unpublished_age_seconds":
                health = of(_label(labels, "service"))
                health.outbox_oldest_age_s = max(health.outbox_oldest_age_s or 0, value)
            elif metric == "clearhouse_relay_publish_errors_total":
                health = of(_label(labels, "service"))
                health.relay_publish_errors = (health.relay_publish_errors or 0) + value
            elif metric in ("clearhouse_consumer_lag", "clearhouse_dlq_messages_total",
                            "clearhouse_consumer_failures_total"):
                key = (_label(labels, "consumer"), _label(labels, "topic"))
                {"clearhouse_consumer_lag": lag, "clearhouse_dlq_messages_total": dlq,
                 "clearhouse_consumer_failures_total": failures}[metric][key] += value
                owners[key] = process.split("-")[0]
        service = next((_label(labels, "service") for (metric, labels) in sample.values
                        if metric == "clearhouse_http_requests_total"), None)
        if before is not None and service:
            window = sample.at - before.at
            if window > 0:
                health = of(service)
                health.rate_window_s = window
                health.error_rate_per_s = (health.error_rate_per_s or 0) + max(errors_now - errors_then, 0) / window
    for health in by_service.values():
        if health.outbox_backlog is not None and health.relay_publish_errors is None:
            health.relay_publish_errors = 0.0  # the relay answered and has never failed a publish
    for key in sorted(owners):
        consumer, topic = key
        # A consumer is shown under the service whose process exports it (payments-consumer → payments).
        of(owners[key]).consumers.append({"service": owners[key], "consumer": consumer, "topic": topic,
                                          "lag": lag.get(key, 0.0),
                                          "dlq": dlq.get(key, 0.0), "failures": failures.get(key, 0.0)})
    order = {name: i for i, name in enumerate(("gateway", *UPSTREAMS))}
    return sorted(by_service.values(), key=lambda h: (order.get(h.service, len(order)), h.service))
