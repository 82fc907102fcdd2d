"""One platform process: a service's API, its relay, or its consumers (`clearhouse serve`).

The same entry point runs on a laptop under `clearhouse up`, in a container, and in a
Kubernetes Deployment; only the environment differs. Every service package offers the
same rooms: `settings.Settings`, `api.create_app()`, `consumers.build_consumers()` and
`migrations/`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from pathlib import Path
from types import ModuleType

from shared.kafka import service_topics

SERVICES = ("payments", "approvals", "ledger", "reconciliation")
ROLES = ("api", "relay", "consumer")
# HTTP-only components: the public door and the sandbox processor (no event log of their own).
APPS = {"gateway": "gateway.api:create_app", "sandbox": "services.sandbox.api:create_app"}

log = logging.getLogger(__name__)


def service_module(service: str, room: str) -> ModuleType:
    if service == "gateway":
        return importlib.import_module(f"gateway.{room}")
    if service not in SERVICES and service not in APPS:
        raise SystemExit(f"unknown service {service!r}; one of {', '.join([*SERVICES, *APPS])}")
    return importlib.import_module(f"services.{service}.{room}")


def _optional_room(service: str, room: str) -> ModuleType | None:
    try:
        return service_module(service, room)
    except ModuleNotFoundError as exc:
        if exc.name != f"services.{service}.{room}":
            raise
        return None


def migrations_dir(service: str) -> Path:
    return Path(service_module(service, "settings").__file__).parent / "migrations"


def settings_for(service: str):
    return service_module(service, "settings").Settings()


def _install_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def _worker_health(service: str, settings, engine):
    """Probes for a relay or consumer process: its database, schema and broker."""
    from shared.health import WorkerHealth, standard_checks

    return WorkerHealth(standard_checks(engine=engine, migrations_dir=migrations_dir(service),
                                        bootstrap=settings.kafka_bootstrap_servers))


async def run_relay(service: str) -> None:
    from shared.db import make_engine
    from shared.metrics import serve_metrics
    from shared.relay import Relay
    from shared.logs import setup_logging
    from shared.telemetry import setup_telemetry

    settings = settings_for(service)
    setup_logging(service, level=settings.log_level, role="relay")
    setup_telemetry(service, role="relay")
    # The relay itself speaks asyncpg; this small pool only answers the health checks.
    health_engine = make_engine(settings.database_url, pool_size=1, application_name=f"{service}-relay-health")
    health = _worker_health(service, settings, health_engine)
    if settings.metrics_port:
        serve_metrics(settings.metrics_port, health=health)
    stop = asyncio.Event()
    _install_stop(stop)
    relay = Relay(service=service, database_url=settings.database_url, bootstrap=settings.kafka_bootstrap_servers,
                  batch_size=settings.relay_batch_size, poll_interval_s=settings.relay_poll_interval_s)
    try:
        await asyncio.gather(relay.run(stop), health.monitor(stop))
    finally:
        await health_engine.dispose()


async def run_consumers(service: str) -> None:
    from shared.db import make_engine, make_sessionmaker
    from shared.metrics import refresh_periodically, serve_metrics
    from shared.logs import setup_logging
    from shared.telemetry import instrument_engine, setup_telemetry

    settings = settings_for(service)
    setup_logging(service, level=settings.log_level, role="consumer")
    setup_telemetry(service, role="consumer")
    engine = make_engine(settings.database_url, pool_size=5, application_name=f"{service}-consumer")
    instrument_engine(engine)
    health = _worker_health(service, settings, engine)
    if settings.metrics_port:
        serve_metrics(settings.metrics_port, health=health)
    sessionmaker = make_sessionmaker(engine)
    consumers = service_module(service, "consumers").build_consumers(settings=settings, sessionmaker=sessionmaker)
    # Periodic jobs (expiry, submission, janitors) and the domain gauges' queries live
    # beside the consumers: same process kind, same database pool, same graceful stop.
    jobs = _optional_room(service, "jobs")
    gauges = _optional_room(service, "gauges")
    stop = asyncio.Event()
    _install_stop(stop)
    try:
        tasks = [c.run(stop) for c in consumers]
        tasks.append(health.monitor(stop))
        if jobs is not None:
            tasks.append(jobs.run_jobs(settings=settings, sessionmaker=sessionmaker, stop=stop))
        if gauges is not None:
            tasks.append(refresh_periodically(lambda: gauges.refresh(sessionmaker), service=service,
                                              interval_s=settings.domain_gauges_interval_s, stop=stop))
        await asyncio.gather(*tasks)
    finally:
        await engine.dispose()


def run_api(service: str, *, host: str, port: int) -> None:
    import uvicorn

    from shared.logs import uvicorn_log_config

    app = APPS.get(service, f"services.{service}.api:create_app")
    uvicorn.run(app, factory=True, host=host, port=port, log_config=uvicorn_log_config(), access_log=False,
                lifespan="on")


def serve(service: str, role: str, *, host: str = "127.0.0.1", port: int | None = None) -> None:
    if service in APPS and role != "api":
        raise SystemExit(f"{service} has only the api role")
    if role == "api":
        run_api(service, host=host, port=port or settings_for(service).port)
    elif role == "relay":
        asyncio.run(run_relay(service))
    elif role == "consumer":
        asyncio.run(run_consumers(service))
    else:
        raise SystemExit(f"unknown role {role!r}; one of {', '.join(ROLES)}")


__all__ = ["SERVICES", "ROLES", "serve", "migrations_dir", "settings_for", "service_topics"]
