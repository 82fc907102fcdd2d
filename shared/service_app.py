"""Wires one service's API process: JSON logs, traces, an instrumented engine and the
kit's app factory. Every service's `api.create_app()` is a call to `build_service_app`
with its own routers, so they all start the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastapi import APIRouter, FastAPI

from shared.api import create_app
from shared.db import make_engine, make_sessionmaker
from shared.logs import setup_logging
from shared.settings import KitSettings
from shared.timeline import router as timeline_router
from shared.telemetry import instrument_app, instrument_engine, instrument_httpx, setup_telemetry


def build_service_app(
    *,
    settings: KitSettings,
    routers: Sequence[APIRouter],
    migrations_dir: Path,
    public_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    service = settings.service_name
    setup_logging(service, level=settings.log_level, role="api")
    setup_telemetry(service, role="api")
    instrument_httpx()
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size, application_name=f"{service}-api")
    instrument_engine(engine)
    app = create_app(service_name=service, settings=settings, routers=[*routers, timeline_router], engine=engine,
                     sessionmaker=make_sessionmaker(engine), public_routers=public_routers,
                     migrations_dir=migrations_dir, broker_bootstrap=settings.kafka_bootstrap_servers)
    app.state.settings = settings
    instrument_app(app)
    return app
