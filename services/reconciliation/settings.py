"""Configuration of the reconciliation service, from environment variables."""

from shared.settings import KitSettings


class Settings(KitSettings):
    service_name: str = "reconciliation"
    port: int = 8004
