"""Configuration of the payments service, from environment variables.

The kit's settings (`DATABASE_URL`, `PORT`, `KAFKA_BOOTSTRAP_SERVERS`, ...) are shared and
unprefixed; the service's own knobs are read from `PAYMENTS_*` variables. Secrets are
`SecretStr` so they never appear in a repr or a log line.

Two secrets have a development fallback so that `clearhouse up` works on a laptop with no
configuration: when they are not set, they are generated once and persisted under
`$CLEARHOUSE_HOME/secrets/` (mode 0600). A production deployment sets them explicitly and
sets `PAYMENTS_REQUIRE_CONFIGURED_SECRETS=true`, which turns the fallback into a refusal
to start.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from pathlib import Path

import orjson
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from shared.settings import KitSettings

ROOT = Path(__file__).resolve().parents[2]


def _env(name: str) -> AliasChoices:
    """Accept `PAYMENTS_<NAME>` from the environment and the field name in code."""
    return AliasChoices(f"PAYMENTS_{name.upper()}", name)


class Settings(KitSettings):
    service_name: str = "payments"
    port: int = 8001

    # ── topics this service consumes (tests point them at topics of their own) ──
    approvals_topic: str = Field(default="approvals.events", validation_alias=_env("approvals_topic"))
    ledger_topic: str = Field(default="ledger.events", validation_alias=_env("ledger_topic"))
    consumer_group: str = Field(default="payments-decisions", validation_alias=_env("consumer_group"))

    # ── payee encryption at rest ──
    # JSON object {key_id: base64 of 32 random bytes}; every key that ever encrypted a
    # stored value must stay here until the data is re-encrypted (rotation = add a key,
    # point `payee_key_id` at it; old rows still decrypt by their stored key id).
    payee_keys: SecretStr | None = Field(default=None, validation_alias=_env("payee_keys"))
    payee_key_id: str | None = Field(default=None, validation_alias=_env("payee_key_id"))
    require_configured_secrets: bool = Field(default=False, validation_alias=_env("require_configured_secrets"))

    # ── the sandbox processor ──
    sandbox_url: str = Field(default="http://127.0.0.1:8010", validation_alias=_env("sandbox_url"))
    sandbox_api_key: SecretStr | None = Field(default=None, validation_alias=_env("sandbox_api_key"))
    sandbox_webhook_secret: SecretStr | None = Field(default=None, validation_alias=_env("sandbox_webhook_secret"))
    webhook_tolerance_s: int = Field(default=300, ge=1, le=3600, validation_alias=_env("webhook_tolerance_s"))
    processor_timeout_s: float = Field(default=5.0, gt=0, le=60, validation_alias=_env("processor_timeout_s"))

    # ── submission and janitor jobs ──
    submit_max_tries: int = Field(default=6, ge=1, le=50, validation_alias=_env("submit_max_tries"))
    submit_backoff_base_s: float = Field(default=0.5, gt=0, validation_alias=_env("submit_backoff_base_s"))
    submit_backoff_max_s: float = Field(default=60.0, gt=0, validation_alias=_env("submit_backoff_max_s"))
    # Attempts claimed and sent at once per round (each holds a connection while recorded).
    submit_concurrency: int = Field(default=16, ge=1, le=100, validation_alias=_env("submit_concurrency"))
    submit_poll_interval_s: float = Field(default=0.5, gt=0, validation_alias=_env("submit_poll_interval_s"))
    # Longer than the processor timeout: a claimed attempt is not claimed again while its
    # request may still be on the wire.
    submit_lease_s: float = Field(default=30.0, gt=0, validation_alias=_env("submit_lease_s"))
    breaker_failure_threshold: int = Field(default=5, ge=1, validation_alias=_env("breaker_failure_threshold"))
    breaker_cooldown_s: float = Field(default=10.0, gt=0, validation_alias=_env("breaker_cooldown_s"))
    janitor_interval_s: float = Field(default=5.0, gt=0, validation_alias=_env("janitor_interval_s"))
    # A submitted attempt with no final word from the processor after this long is polled.
    janitor_stuck_after_s: float = Field(default=60.0, ge=0, validation_alias=_env("janitor_stuck_after_s"))
    janitor_recheck_s: float = Field(default=30.0, gt=0, validation_alias=_env("janitor_recheck_s"))

    @model_validator(mode="after")
    def _lease_outlives_a_call(self) -> "Settings":
        # A claimed attempt must not be claimed again while its request may be on the wire.
        if self.submit_lease_s <= self.processor_timeout_s:
            raise ValueError("PAYMENTS_SUBMIT_LEASE_S must be longer than PAYMENTS_PROCESSOR_TIMEOUT_S")
        return self

    @field_validator("payee_key_id")
    @classmethod
    def _key_id_shape(cls, value: str | None) -> str | None:
        if value is not None and not (1 <= len(value) <= 32 and value.replace("-", "").replace("_", "").isalnum()):
            raise ValueError("payee_key_id is 1-32 letters, digits, '-' or '_'")
        return value

    # ── resolved secrets ──
    def payee_keyring(self) -> tuple[str, dict[str, bytes]]:
        """(current key id, {key id: 32-byte key}). Falls back to a generated, persisted
        development keyring unless secrets are required to be configured."""
        if self.payee_keys is None:
            self._refuse_fallback("PAYMENTS_PAYEE_KEYS")
            raw = _dev_secret("payments-payee-keys.json", lambda: orjson.dumps(
                {"dev-1": base64.b64encode(secrets.token_bytes(32)).decode()}).decode())
        else:
            raw = self.payee_keys.get_secret_value()
        try:
            encoded = orjson.loads(raw)
            keyring = {str(k): base64.b64decode(v, validate=True) for k, v in encoded.items()}
        except (orjson.JSONDecodeError, AttributeError, ValueError, TypeError):
            raise ValueError("PAYMENTS_PAYEE_KEYS must be a JSON object {key_id: base64 key}") from None
        if not keyring or any(len(key) != 32 for key in keyring.values()):
            raise ValueError("PAYMENTS_PAYEE_KEYS needs at least one key, each exactly 32 bytes (AES-256)")
        current = self.payee_key_id or (sorted(keyring)[-1] if self.payee_keys is None else None)
        if current is None:
            raise ValueError("PAYMENTS_PAYEE_KEY_ID must name the key that encrypts new values")
        if current not in keyring:
            raise ValueError(f"PAYMENTS_PAYEE_KEY_ID {current!r} is not in PAYMENTS_PAYEE_KEYS")
        return current, keyring

    def webhook_secret(self) -> bytes:
        if self.sandbox_webhook_secret is not None:
            return self.sandbox_webhook_secret.get_secret_value().encode()
        self._refuse_fallback("PAYMENTS_SANDBOX_WEBHOOK_SECRET")
        return _dev_secret("sandbox-webhook-secret", lambda: secrets.token_hex(32)).encode()

    def _refuse_fallback(self, variable: str) -> None:
        if self.require_configured_secrets:
            raise ValueError(f"{variable} is not set and PAYMENTS_REQUIRE_CONFIGURED_SECRETS forbids a dev default")


def clearhouse_home() -> Path:
    return Path(os.environ.get("CLEARHOUSE_HOME", ROOT / ".clearhouse")).resolve()


def _dev_secret(name: str, generate) -> str:
    """A development secret shared by the processes of one `clearhouse up`: created once
    (O_EXCL, so two processes starting together agree on one value), then read."""
    path = clearhouse_home() / "secrets" / name
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(generate())
    for _ in range(50):  # the creator may still be writing
        value = path.read_text().strip()
        if value:
            return value
        time.sleep(0.01)
    raise ValueError(f"development secret {path} is empty")
