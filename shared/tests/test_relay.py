"""The relay against real PostgreSQL and the real broker: nothing committed is lost,
nothing uncommitted is published, order per aggregate holds, one active replica."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY

from shared.db import plain_url
from shared.kafka import ensure_topics
from shared.relay import PublishFailed, Relay
from shared.tests.conftest import eventually, read_topic


@contextlib.asynccontextmanager
async def running(relay: Relay):
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def make_relay(kit, platform, **options) -> Relay:
    return Relay(service=kit.service, database_url=kit.db.app_url, bootstrap=platform.bootstrap,
                 poll_interval_s=0.2, **options)


def event_ids(records) -> list[str]:
    return [dict(r.headers)["ce_id"].decode() for r in records]


async def test_publishes_iff_committed_with_cloudevents_headers(kit, platform):
    committed = await kit.increment("a")
    with pytest.raises(RuntimeError):
        await kit.increment("b", fail=True)
    async with running(make_relay(kit, platform)):
        records = await read_topic(platform.bootstrap, kit.topic, expect=1)
        await eventually(lambda: kit.scalar("SELECT count(*) = 0 FROM events WHERE published_at IS NULL"))
    assert event_ids(records) == [str(committed.id)]
    assert await kit.scalar("SELECT count(*) FROM events") == 1  # the rolled-back event never existed
    headers = dict(records[0].headers)
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_type"] == b"counter.incremented.v1"
    assert headers["ce_source"] == f"/clearhouse/{kit.service}".encode()
    assert headers["ce_subject"] == b"a" and records[0].key == b"a"
    assert headers["ce_tenantid"] == b"t1" and headers["ce_actor"] == b"user:test"
    assert orjson.loads(records[0].value) == {"by": 1, "value": 1}


async def test_published_events_are_counted_by_service_and_type(kit, platform):
    """`payment.settled.v1` published per second is how dashboards show payments by status."""
    def published() -> float:
        return REGISTRY.get_sample_value("clearhouse_events_published_total",
                                         {"service": kit.service, "type": "counter.incremented.v1"}) or 0.0

    for counter in ("a", "b", "a"):
        await kit.increment(counter)
    async with running(make_relay(kit, platform)):
        await eventually(lambda: kit.scalar("SELECT count(*) = 0 FROM events WHERE published_at IS NULL"))
    assert published() == 3


async def test_wakes_on_notify_without_waiting_for_the_poll(kit, platform):
    relay = Relay(service=kit.service, database_url=kit.db.app_url, bootstrap=platform.bootstrap,
                  poll_interval_s=30)
    async with running(relay):
        await asyncio.wait_for(relay.active.wait(), 10)
        await asyncio.sleep(0.5)  # the relay is idle, parked on a 30 s poll
        event = await kit.increment("n")
        records = await read_topic(platform.bootstrap, kit.topic, expect=1, timeout=5)
    assert event_ids(records) == [str(event.id)]


async def test_per_aggregate_order_with_concurrent_writers(kit, platform):
    async def writer(counter: str) -> None:
        for _ in range(25):
            await kit.increment(counter)

    counters = [f"c{i}" for i in range(4)]
    async with running(make_relay(kit, platform, batch_size=7)):
        # 3 concurrent writers per counter contend for the same aggregates.
        await asyncio.gather(*(writer(c) for c in counters for _ in range(3)))
        records = await read_topic(platform.bootstrap, kit.topic, expect=300)
    seen: dict[str, list[int]] = collections.defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        seen[record.key.decode()].append(orjson.loads(record.value)["value"])
    for counter in counters:
        assert seen[counter] == list(range(1, 76)), counter


async def test_relay_killed_between_publish_and_mark_publishes_again(kit, platform):
    event = await kit.increment("k")
    # Hold a row lock on the event so the relay publishes it, then blocks when marking it.
    blocker = await asyncpg.connect(plain_url(platform.superuser_url(kit.db)))
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("SELECT 1 FROM events WHERE id = $1 FOR UPDATE", event.id)
    proc = subprocess.Popen([sys.executable, "-m", "shared.tests.relay_process", kit.service, kit.db.app_url,
                             platform.bootstrap])
    try:
        first = await read_topic(platform.bootstrap, kit.topic, expect=1)
        assert event_ids(first) == [str(event.id)]
        os.kill(proc.pid, signal.SIGKILL)  # dies after the broker ack, before published_at is set
        proc.wait(10)
        # Its server session would notice the dead client only when it next writes to it;
        # end it as the server eventually would, before the row lock is released.
        await blocker.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                              f"{kit.service}-relay")
    finally:
        if proc.poll() is None:
            proc.kill()
        await tx.rollback()
        await blocker.close()
    assert await kit.scalar("SELECT published_at IS NULL FROM events WHERE id = :id", id=event.id)
    async with running(make_relay(kit, platform)):
        records = await read_topic(platform.bootstrap, kit.topic, expect=2)
        await eventually(lambda: kit.scalar("SELECT published_at IS NOT NULL FROM events WHERE id = :id", id=event.id))
    assert event_ids(records) == [str(event.id)] * 2  # at least once: the duplicate is the consumer's to skip


async def test_only_one_replica_publishes_and_a_standby_takes_over(kit, platform):
    first, second = make_relay(kit, platform), make_relay(kit, platform)
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    first_task = asyncio.create_task(first.run(stop_first))
    await asyncio.wait_for(first.active.wait(), 10)
    second_task = asyncio.create_task(second.run(stop_second))
    try:
        await asyncio.sleep(1.0)
        assert not second.active.is_set()
        await kit.increment("x")
        # The active replica dies: its process stops and its database session is gone.
        stop_first.set()
        killer = await asyncpg.connect(plain_url(platform.superuser_url(kit.db)))
        await killer.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
        await killer.close()
        await asyncio.wait_for(first_task, 10)
        await asyncio.wait_for(second.active.wait(), 5)
        for _ in range(5):
            await kit.increment("x")
        records = await read_topic(platform.bootstrap, kit.topic, expect=6)
    finally:
        stop_first.set()
        stop_second.set()
        await asyncio.wait_for(asyncio.gather(first_task, second_task), 10)
    values = [orjson.loads(r.value)["value"] for r in sorted(records, key=lambda r: r.offset)]
    assert sorted(set(values)) == [1, 2, 3, 4, 5, 6]
    # Order holds across the takeover (a resend may repeat a value, never reorder).
    assert values == sorted(values)


async def test_survives_a_broker_outage_and_replays_into_an_empty_broker(kit, platform):
    relay = make_relay(kit, platform)
    relay._topic_check_interval_s = 0.5
    async with running(relay):
        before = [await kit.increment("r") for _ in range(3)]
        await read_topic(platform.bootstrap, kit.topic, expect=3)
        platform.restart_broker()  # in-memory: comes back with no topics and no data
        after = [await kit.increment("r") for _ in range(2)]
        records = await read_topic(platform.bootstrap, kit.topic, expect=5, timeout=30)
    assert set(event_ids(records)) == {str(e.id) for e in before + after}
    assert await kit.scalar("SELECT count(*) FROM events WHERE published_at IS NULL") == 0


async def test_broker_loss_is_seen_even_when_the_events_topic_came_back_first(kit, platform):
    """A fresh broker auto-creates a topic as soon as a consumer subscribes to it: the
    events topic existing again proves nothing, the relay's marker topic does."""
    before = [await kit.increment("m") for _ in range(3)]
    async with running(make_relay(kit, platform)):
        await read_topic(platform.bootstrap, kit.topic, expect=3)
    platform.restart_broker()
    await ensure_topics(platform.bootstrap, [kit.topic])  # what a subscribing consumer makes the broker do
    async with running(make_relay(kit, platform)):
        records = await read_topic(platform.bootstrap, kit.topic, expect=3, timeout=30)
    assert event_ids(records) == [str(e.id) for e in before]


async def test_a_replay_that_failed_half_way_is_tried_again(kit, platform):
    """A fresh broker may refuse the first writes (Tansu answers errors while it settles):
    the loss is remembered until a replay went through, not just until one started."""
    before = [await kit.increment("h") for _ in range(3)]
    async with running(make_relay(kit, platform)):
        await read_topic(platform.bootstrap, kit.topic, expect=3)
    platform.restart_broker()
    await ensure_topics(platform.bootstrap, [kit.topic])  # a consumer's subscription recreates it
    relay, refused = make_relay(kit, platform), []
    publish_range = relay._publish_range

    async def refuse_the_first(conn, producer, first, last):
        if not refused:
            refused.append((first, last))
            raise PublishFailed(f"replay stopped at seq {first}: the broker refused it")
        return await publish_range(conn, producer, first, last)

    relay._publish_range = refuse_the_first
    async with running(relay):
        records = await read_topic(platform.bootstrap, kit.topic, expect=3, timeout=30)
    assert refused and event_ids(records) == [str(e.id) for e in before]


async def test_replay_publishes_a_range_again(kit, platform):
    events = [await kit.increment("p") for _ in range(5)]
    async with running(make_relay(kit, platform)):
        await read_topic(platform.bootstrap, kit.topic, expect=5)
    seqs = [await kit.scalar("SELECT seq FROM events WHERE id = :id", id=e.id) for e in events]
    replayed = await make_relay(kit, platform).replay(from_seq=seqs[1], to_seq=seqs[3])
    assert replayed == 3
    records = await read_topic(platform.bootstrap, kit.topic, expect=8)
    assert event_ids(records) == [str(e.id) for e in events] + [str(e.id) for e in events[1:4]]


async def test_event_log_is_append_only_for_the_service_role(kit):
    await kit.increment("a")
    conn = await asyncpg.connect(plain_url(kit.db.app_url))
    try:
        for statement in ("DELETE FROM events", "UPDATE events SET payload = '{}'", "UPDATE events SET actor = 'x'",
                          "TRUNCATE events"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        await conn.execute("UPDATE events SET published_at = now()")  # the one permitted change
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE events SET published_at = now() + interval '1 day'")  # set once
    finally:
        await conn.close()
    owner = await asyncpg.connect(plain_url(kit.db.owner_url))
    try:  # even the owner cannot rewrite history: the trigger guards it
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await owner.execute("DELETE FROM events")
    finally:
        await owner.close()
