"""Configuration of the approvals service, from environment variables."""

from shared.settings import KitSettings


class Settings(KitSettings):
    service_name: str = "approvals"
    port: int = 8002
