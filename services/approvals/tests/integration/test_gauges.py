"""The approval queue gauges count what waits for people, nothing decided or automatic."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.approvals import gauges
from services.approvals.tests.integration.conftest import open_payment


def pending() -> float:
    return REGISTRY.get_sample_value("clearhouse_approvals_pending")


def oldest_age() -> float:
    return REGISTRY.get_sample_value("clearhouse_approvals_oldest_pending_age_seconds")


async def test_queue_length_and_oldest_age_count_pending_requests_only(sessionmaker, settings, tenant, as_, http):
    await gauges.refresh(sessionmaker)
    assert (pending(), oldest_age()) == (0, 0)

    await open_payment(sessionmaker, settings, tenant, amount=500)  # below the threshold: granted by policy
    first = await open_payment(sessionmaker, settings, tenant, amount=150_000)
    await open_payment(sessionmaker, settings, tenant, amount=2_000_000)
    await gauges.refresh(sessionmaker)
    assert pending() == 2
    assert 0 < oldest_age() < 120

    decided = await http.post(f"/v1/approvals/{first.id}/decisions", json={"decision": "reject", "reason": "no"},
                              headers=as_("checker", **{"Idempotency-Key": "gauge-1"}))
    assert decided.status_code == 201, decided.text
    await gauges.refresh(sessionmaker)
    assert pending() == 1
