"""Configuration of the sandbox processor, from `SANDBOX_*` environment variables.

The webhook secret falls back, like the payments service's, to a development secret
generated once under `$CLEARHOUSE_HOME/secrets/sandbox-webhook-secret`: both processes
of one `clearhouse up` read the same file, so they agree without configuration.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SANDBOX_", extra="ignore", populate_by_name=True)

    service_name: str = "sandbox"
    port: int = Field(default=8010, validation_alias="PORT")
    # Where webhooks go: the payments service's public webhook route.
    webhook_url: str = "http://127.0.0.1:8001/v1/payments/webhooks/sandbox"
    webhook_secret: SecretStr | None = None
    # When set, calls must carry `Authorization: Bearer <api_key>`.
    api_key: SecretStr | None = None
    processing_delay_s: float = Field(default=0.2, ge=0)  # accepted → processing
    settle_delay_s: float = Field(default=1.0, ge=0)  # processing → settled | failed
    refund_delay_s: float = Field(default=0.5, ge=0)  # refund accepted → succeeded | failed
    stall_s: float = Field(default=10.0, ge=0)  # how long a TIMEOUT reference stalls its first answer
    webhook_attempts: int = Field(default=8, ge=1)
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    # Chaos mode (the fault suite): when a seed is set, every webhook is delivered 1–3
    # times, each copy after its own random delay up to the maximum, in no particular order.
    webhook_chaos_seed: int | None = None
    webhook_chaos_max_delay_s: float = Field(default=2.0, ge=0)
    # SQLite file for the sandbox's state; ":memory:" forgets everything on restart.
    db_path: str = ":memory:"
    account_id: str = "SANDBOX-SETTLEMENT"
    log_level: str = Field(default="INFO", validation_alias="LOG_LEVEL")

    def secret(self) -> bytes:
        if self.webhook_secret is not None:
            return self.webhook_secret.get_secret_value().encode()
        return _dev_secret("sandbox-webhook-secret").encode()


def _dev_secret(name: str) -> str:
    home = Path(os.environ.get("CLEARHOUSE_HOME", ROOT / ".clearhouse")).resolve()
    path = home / "secrets" / name
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    for _ in range(50):
        value = path.read_text().strip()
        if value:
            return value
        time.sleep(0.01)
    raise ValueError(f"development secret {path} is empty")
