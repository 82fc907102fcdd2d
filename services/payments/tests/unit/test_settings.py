"""Settings: the service's own knobs come from PAYMENTS_* variables, keys are checked
when the process starts, and the development fallback for secrets is generated once,
shared, private, and refused where configured secrets are required."""

from __future__ import annotations

import base64
import json
import stat

import pytest
from pydantic import ValidationError

from services.payments.settings import Settings

KEY = base64.b64encode(b"\x07" * 32).decode()


def test_knobs_and_keyring_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("PAYMENTS_PAYEE_KEYS", json.dumps({"2024": KEY, "2025": KEY}))
    monkeypatch.setenv("PAYMENTS_PAYEE_KEY_ID", "2025")
    monkeypatch.setenv("PAYMENTS_SANDBOX_URL", "http://sandbox:8010")
    monkeypatch.setenv("PAYMENTS_WEBHOOK_TOLERANCE_S", "120")
    settings = Settings()
    current, keyring = settings.payee_keyring()
    assert current == "2025" and set(keyring) == {"2024", "2025"}
    assert settings.sandbox_url == "http://sandbox:8010" and settings.webhook_tolerance_s == 120
    assert KEY not in repr(settings)


@pytest.mark.parametrize("keys, key_id", [
    ("not json", "k"), (json.dumps({"k": "short"}), "k"),
    (json.dumps({"k": base64.b64encode(b"x" * 16).decode()}), "k"),
    (json.dumps({"k": KEY}), "other"), (json.dumps({"k": KEY}), None), (json.dumps([]), "k"),
])
def test_a_bad_keyring_stops_the_service(keys, key_id):
    settings = Settings(payee_keys=keys, payee_key_id=key_id)
    with pytest.raises(ValueError):
        settings.payee_keyring()


def test_the_dev_fallback_is_generated_once_and_kept_private(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARHOUSE_HOME", str(tmp_path))
    first, again = Settings(), Settings()
    assert first.payee_keyring() == again.payee_keyring()
    assert first.webhook_secret() == again.webhook_secret() and len(first.webhook_secret()) == 64
    for path in (tmp_path / "secrets").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_production_refuses_the_dev_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARHOUSE_HOME", str(tmp_path))
    settings = Settings(require_configured_secrets=True)
    with pytest.raises(ValueError, match="PAYMENTS_PAYEE_KEYS"):
        settings.payee_keyring()
    with pytest.raises(ValueError, match="PAYMENTS_SANDBOX_WEBHOOK_SECRET"):
        settings.webhook_secret()


def test_the_lease_must_outlive_a_processor_call():
    with pytest.raises(ValidationError):
        Settings(processor_timeout_s=10, submit_lease_s=5)
