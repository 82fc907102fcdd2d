"""A reservation committed by the consumer wakes the submitter in the same process: the
payment goes to the processor at once, not at the submitter's next poll (here a minute
away, so only the wake-up can send it within the test's time)."""

from __future__ import annotations

import time

import pytest

from services.payments.tests.integration.harness import running_flow


@pytest.fixture(scope="module")
async def flow(db, platform, internal_keys, sessionmaker, tmp_path_factory):
    async with running_flow(db, platform, internal_keys, sessionmaker, tmp_path_factory.mktemp("sandbox"),
                            submit_poll_interval_s=60.0) as found:
        yield found


async def test_a_committed_reservation_is_sent_without_waiting_for_the_poll(flow):
    payment = await flow.create(reference="Invoice wake")
    await flow.grant(payment["id"])
    await flow.wait_status(payment["id"], "approved")
    reserved_at = time.monotonic()
    await flow.hold(payment["id"])
    await flow.wait_status(payment["id"], "settled", timeout=30)
    assert time.monotonic() - reserved_at < 30  # the poll would have waited 60 s
