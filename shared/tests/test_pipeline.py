"""Relay and inbox together, through the faults the kit exists for: the effect of every
committed event is applied exactly once even when the relay dies after publishing but
before marking, and when the broker forgets everything and the log is replayed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import asyncpg

from shared.db import plain_url
from shared.tests.conftest import eventually, read_topic
from shared.tests.test_inbox import consuming
from shared.tests.test_relay import make_relay, running


async def test_relay_killed_before_marking_resends_and_the_consumer_applies_once(kit, platform):
    event = await kit.increment("once", by=5)
    blocker = await asyncpg.connect(plain_url(platform.superuser_url(kit.db)))
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("SELECT 1 FROM events WHERE id = $1 FOR UPDATE", event.id)
    proc = subprocess.Popen([sys.executable, "-m", "shared.tests.relay_process", kit.service, kit.db.app_url,
                             platform.bootstrap])
    try:
        await read_topic(platform.bootstrap, kit.topic, expect=1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        await blocker.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                              f"{kit.service}-relay")
    finally:
        if proc.poll() is None:
            proc.kill()
        await tx.rollback()
        await blocker.close()
    async with running(make_relay(kit, platform)), consuming(kit, platform):
        assert len(await read_topic(platform.bootstrap, kit.topic, expect=2)) == 2  # published twice
        await eventually(lambda: kit.scalar(
            "SELECT count(*) = 1 FROM processed_events WHERE event_type = 'counter.incremented.v1'"))
        await asyncio.sleep(1.0)  # give a wrongly applied duplicate the time to show
    assert await kit.value("applied:once") == 5


async def test_broker_that_forgot_everything_is_replayed_and_nothing_is_applied_twice(kit, platform):
    relay = make_relay(kit, platform)
    relay._topic_check_interval_s = 0.5
    async with running(relay):
        async with consuming(kit, platform):
            for _ in range(3):
                await kit.increment("fg")
            await eventually(lambda: kit.scalar("SELECT value = 3 FROM counters WHERE id = 'applied:fg'"))
        platform.restart_broker()  # empty: no topics, no offsets, no data
        for _ in range(2):
            await kit.increment("fg")
        # A consumer group that lost its offsets reads the replayed log from the start.
        async with consuming(kit, platform):
            await eventually(lambda: kit.scalar(
                "SELECT count(*) = 5 FROM processed_events WHERE event_type = 'counter.incremented.v1'"), timeout=40)
            await asyncio.sleep(1.0)
    assert await kit.value("applied:fg") == 5
    assert await kit.scalar("SELECT count(*) FROM events WHERE published_at IS NULL") == 0
