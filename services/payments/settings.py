"""Configuration of the payments service, from environment variables."""

from shared.settings import KitSettings


class Settings(KitSettings):
    service_name: str = "payments"
    port: int = 8001
