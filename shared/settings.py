"""Configuration from environment variables, one settings class per service.

Secrets are `SecretStr` so they never appear in a repr or a log line.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class KitSettings(BaseSettings):
    """What every service process needs. A service subclasses it with its own prefix,
    e.g. `LEDGER_DATABASE_URL`; unprefixed `KAFKA_BOOTSTRAP_SERVERS` etc. are shared."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    service_name: str = "clearhouse"
    database_url: str = Field(default="postgresql://postgres@127.0.0.1:5432/postgres")
    # Migrations run as the owner role; the service runs as a role that cannot rewrite history.
    migration_database_url: str | None = None
    kafka_bootstrap_servers: str = Field(default="127.0.0.1:9092", validation_alias="KAFKA_BOOTSTRAP_SERVERS")
    port: int = 8000  # the API's listening port
    metrics_port: int | None = None  # relay/consumer processes serve /metrics, /healthz, /readyz here
    # How often the consumer process re-runs the service's domain gauge queries (gauges.py):
    # about the scrape interval, so each scrape sees fresh values and the queries stay rare.
    domain_gauges_interval_s: float = 15.0
    db_pool_size: int = 20
    relay_batch_size: int = 500
    relay_poll_interval_s: float = 1.0
    consumer_max_attempts: int = 5
    consumer_batch_size: int = 200
    internal_token_public_key: SecretStr | None = Field(default=None, validation_alias="INTERNAL_TOKEN_PUBLIC_KEY")
    log_level: str = Field(default="INFO", validation_alias="LOG_LEVEL")

    @property
    def topic(self) -> str:
        return f"{self.service_name}.events"
