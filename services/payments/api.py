"""HTTP API of the payments service. Routes are thin: parse, authorise, call one use case."""

from pathlib import Path

from fastapi import FastAPI

from services.payments.settings import Settings
from shared.service_app import build_service_app

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: Settings | None = None) -> FastAPI:
    return build_service_app(settings=settings or Settings(), routers=[], migrations_dir=MIGRATIONS)
