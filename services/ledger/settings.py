"""Configuration of the ledger service, from environment variables."""

from shared.settings import KitSettings


class Settings(KitSettings):
    service_name: str = "ledger"
    port: int = 8003
