"""`refresh_periodically`: a service's gauge queries run at once and then on a period; a
failed round is counted and the loop goes on, so a database blip never ends the process."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from shared.metrics import refresh_periodically
from shared.testing import eventually


def rounds(service: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("clearhouse_domain_gauge_refreshes_total",
                                     {"service": service, "outcome": outcome}) or 0.0


async def test_a_failed_round_is_counted_and_the_next_one_runs():
    calls = []

    async def refresh() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise ConnectionResetError("the database went away")

    stop = asyncio.Event()
    loop = asyncio.create_task(refresh_periodically(refresh, service="gaugetest", interval_s=0.01, stop=stop))

    async def three_rounds() -> bool:
        return len(calls) >= 3

    await eventually(three_rounds, timeout=10)
    stop.set()
    await asyncio.wait_for(loop, 5)
    assert rounds("gaugetest", "error") == 1
    assert rounds("gaugetest", "ok") == len(calls) - 1
