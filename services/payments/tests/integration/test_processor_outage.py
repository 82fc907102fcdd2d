"""The processor is down, then back: submissions wait behind retries with backoff and an
open circuit, the janitor settles the doubt, and every payment is paid exactly once."""

from __future__ import annotations

import asyncio

import pytest

from services.payments.jobs import CIRCUIT_OPEN
from services.payments.tests.integration.harness import eventually, rows, running_flow, scalar
from services.payments.verify import verify


@pytest.fixture(scope="module")
async def flow(db, platform, internal_keys, sessionmaker, tmp_path_factory):
    async with running_flow(db, platform, internal_keys, sessionmaker, tmp_path_factory.mktemp("outage"),
                            sandbox_up=False, breaker_failure_threshold=3, submit_max_tries=4) as found:
        yield found


def circuit_open() -> float:
    return CIRCUIT_OPEN.labels("sandbox")._value.get()


async def opened() -> bool:
    return circuit_open() == 1.0


async def test_processor_down_then_back(flow, db):
    payments = [(await flow.create(amount=20_000 + i * 100))["id"] for i in range(4)]
    for pid in payments:
        await flow.grant(pid)
    for pid in payments:
        await flow.wait_status(pid, "approved")
        await flow.hold(pid)

    # Down: tries pile up, the circuit opens, and the attempts end in doubt.
    await eventually(lambda: scalar(flow.sessionmaker, "SELECT count(*) = 4 FROM processor_attempts "
                                                       "WHERE status = 'unknown'"), timeout=30)
    await eventually(opened, timeout=10)
    errors = await rows(flow.sessionmaker, "SELECT last_error FROM processor_attempts")
    assert all("cannot connect" in r.last_error for r in errors)
    for pid in payments:
        assert (await flow.get(pid))["status"] == "approved"  # nothing moved, nothing failed

    # Back: the janitor learns the processor never got them, they are sent again, once.
    async with flow.sandbox_running() as sandbox:
        for pid in payments:
            await flow.wait_status(pid, "settled", timeout=30)
        assert circuit_open() == 0.0
        for pid in payments:
            count = sandbox.state.processor.db.execute("SELECT count(*) FROM payouts WHERE end_to_end_id = ?",
                                                       (pid,)).fetchone()[0]
            assert count == 1
            assert (await flow.event_types(pid)).count("payment.submitted.v1") == 1
        assert await verify(db.app_url) == []


async def test_processor_down_after_acceptance_keeps_state_and_finishes(flow, db):
    async with flow.sandbox_running():
        pid = (await flow.create(reference="NOWEBHOOK"))["id"]
        await flow.grant(pid)
        await flow.wait_status(pid, "approved")
        await flow.hold(pid)
        await flow.wait_status(pid, "submitted", "settled")
    # The processor goes away before anyone hears the final word; it comes back later
    # and the janitor asks again.
    await asyncio.sleep(1.0)
    async with flow.sandbox_running():
        await flow.wait_status(pid, "settled", timeout=30)
    assert (await flow.event_types(pid)).count("payment.settled.v1") == 1
