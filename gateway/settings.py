"""Configuration of the gateway, from environment variables.

Unprefixed names like the services' (`DATABASE_URL`, `PORT`); upstreams as
`PAYMENTS_URL`, `LEDGER_TIMEOUT_S`, ... The signing key is a secret: `SecretStr`, read
from `INTERNAL_TOKEN_PRIVATE_KEY` or the file `INTERNAL_TOKEN_PRIVATE_KEY_FILE` names,
never logged.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from shared.settings import KitSettings

UPSTREAMS = ("payments", "approvals", "ledger", "reconciliation")


class Settings(KitSettings):
    service_name: str = "gateway"
    port: int = 8000
    db_pool_size: int = 5  # only cache misses and last-used stamps reach the database

    internal_token_private_key: SecretStr | None = Field(default=None, validation_alias="INTERNAL_TOKEN_PRIVATE_KEY")
    internal_token_private_key_file: Path | None = Field(default=None,
                                                         validation_alias="INTERNAL_TOKEN_PRIVATE_KEY_FILE")
    internal_token_ttl_s: int = 60

    payments_url: str = "http://127.0.0.1:8001"
    approvals_url: str = "http://127.0.0.1:8002"
    ledger_url: str = "http://127.0.0.1:8003"
    reconciliation_url: str = "http://127.0.0.1:8004"
    # Whole-request budget per upstream (connect, write, read); a miss is a 504 naming it.
    payments_timeout_s: float = 10.0
    approvals_timeout_s: float = 10.0
    ledger_timeout_s: float = 10.0
    reconciliation_timeout_s: float = 30.0  # statement uploads and runs are the heavy calls
    connect_timeout_s: float = 2.0
    # Each part of a composed answer (timeline, expand) gets this long before it is
    # reported missing: a composed read should be fast or partial, not slow.
    composition_timeout_s: float = 2.0
    upstream_max_connections: int = 100
    # In flight to one upstream (sent or waiting for a pooled connection) beyond which the
    # gateway answers 503 upstream_busy at once instead of queueing (Envoy's circuit
    # breaker): a backlog only grows latency, and httpcore's pool costs more CPU per
    # request the longer its queue, so an overloaded gateway would otherwise collapse.
    upstream_max_pending: int = 256

    # Token bucket per API key: `rate_limit_burst` requests at once, refilled at
    # `rate_limit_per_s`. In process memory: see docs/gateway.md for replicas.
    rate_limit_per_s: float = 20.0
    rate_limit_burst: int = 40

    max_body_bytes: int = 1024 * 1024
    statement_max_body_bytes: int = 10 * 1024 * 1024  # POST /v1/reconciliation/statements carries a file

    # Keys of the other environment (ch_test_ on a live gateway) are refused.
    key_environment: str = "live"
    # Backstop only: revocations arrive by LISTEN/NOTIFY and evict at once; see keys.py.
    key_cache_ttl_s: float = 5.0
    key_cache_max_entries: int = 10_000
    last_used_resolution_s: float = 60.0

    openapi_cache_ttl_s: float = 60.0
    openapi_retry_s: float = 5.0

    # --- the operations console (gateway/console, docs/console.md) ---------------------
    console_enabled: bool = True
    console_session_ttl_s: int = 8 * 3600  # absolute: a working day, then sign in again
    console_idle_timeout_s: int = 30 * 60  # no page opened (background polls do not count)
    # None: Secure when the request arrived over https; set true behind a TLS-terminating proxy.
    console_cookie_secure: bool | None = None
    # A trace UI's address with {trace_id}, e.g. http://localhost:16686/trace/{trace_id} (Jaeger).
    console_trace_url: str | None = None
    # Where the Health page scrapes: "name=url,name=url". Empty: each upstream's /metrics;
    # `clearhouse up` also names every relay and consumer process.
    console_metrics_targets: str = ""
    console_poll_interval_s: float = 3.0
    # Health shows platform-wide numbers (no tenant data); empty: every signed-in
    # principal sees it, else only principals of these tenants ("ops,platform").
    console_health_tenants: str = ""

    def upstream_url(self, service: str) -> str:
        return getattr(self, f"{service}_url")

    def upstream_timeout(self, service: str) -> float:
        return getattr(self, f"{service}_timeout_s")

    def signing_key(self) -> str | None:
        if self.internal_token_private_key is not None:
            return self.internal_token_private_key.get_secret_value()
        if self.internal_token_private_key_file is not None:
            return self.internal_token_private_key_file.read_text()
        return None
