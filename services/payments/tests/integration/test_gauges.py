"""The in-flight gauges: payments waiting in each non-final status and since when, read
through the partial index the migration adds, nothing final counted."""

from __future__ import annotations

import uuid

from prometheus_client import REGISTRY

from services.payments import gauges
from services.payments.tests.integration.harness import asgi_client, headers, payment_body
from shared.testing import scalar


def in_flight(status: str) -> float:
    return REGISTRY.get_sample_value("clearhouse_payments_in_flight", {"status": status})


def oldest(status: str) -> float:
    return REGISTRY.get_sample_value("clearhouse_payments_oldest_in_flight_age_seconds", {"status": status})


async def test_payments_in_flight_are_counted_by_status_and_final_ones_are_not(app, sessionmaker, private_pem):
    await gauges.refresh(sessionmaker)
    assert [in_flight(s) for s in ("pending_approval", "approved", "submitted")] == [0, 0, 0]

    tenant = f"t-{uuid.uuid4().hex[:8]}"
    created = []
    async with asgi_client(app) as http:
        for _ in range(3):
            response = await http.post("/v1/payments", json=payment_body(),
                                       headers=headers(private_pem, tenant=tenant, idempotency_key=uuid.uuid4().hex))
            assert response.status_code == 201, response.text
            created.append(response.json()["id"])
        cancelled = await http.post(f"/v1/payments/{created[0]}/cancel", json={"reason": "duplicate order"},
                                    headers=headers(private_pem, tenant=tenant, idempotency_key=uuid.uuid4().hex))
        assert cancelled.status_code == 200, cancelled.text

    await gauges.refresh(sessionmaker)
    assert [in_flight(s) for s in ("pending_approval", "approved", "submitted")] == [2, 0, 0]
    assert 0 < oldest("pending_approval") < 120 and oldest("approved") == 0


async def test_the_in_flight_query_has_its_partial_index(sessionmaker):
    definition = await scalar(sessionmaker, "SELECT indexdef FROM pg_indexes WHERE indexname = 'payments_in_flight'")
    assert "WHERE" in definition and "pending_approval" in definition and "settled" not in definition
