"""`clearhouse up` as a user runs it: a real subprocess on the embedded pair, every process
healthy, Ctrl-C stops everything, a second start reuses the data and replays the event log
into the fresh in-memory broker; bad configuration ends with one clear line."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from clearhouse.embedded import free_port, port_open
from tests.running import Up


def service_urls(lines: list[str]) -> dict[str, str]:
    return {m.group(1): m.group(2) for line in lines if (m := re.match(r"\s+(\w+)\s+(http://\S+)$", line))}


async def insert_event(state: dict, service: str) -> uuid.UUID:
    """Write an event into a service's log as its use cases do (as the app role)."""
    event_id = uuid.uuid4()
    conn = await asyncpg.connect(f"postgresql://clearhouse_{service}_app@127.0.0.1:{state['ports']['postgres']}/"
                                 f"clearhouse_{service}")
    try:
        await conn.execute(
            "INSERT INTO events (id, tenant_id, aggregate_type, aggregate_id, type, schema_version, payload, actor) "
            "VALUES ($1, 't1', 'probe', 'p1', 'probe.written.v1', 1, '{}', 'user:test')", event_id)
        for _ in range(100):
            if await conn.fetchval("SELECT published_at IS NOT NULL FROM events WHERE id = $1", event_id):
                return event_id
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    raise AssertionError("the relay of the running platform did not publish the event")


async def topic_event_ids(bootstrap: str, topic: str) -> set[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        await consumer.topics()
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()])
        await consumer.seek_to_beginning()
        batch = await consumer.getmany(timeout_ms=2000)
        return {dict(r.headers)["ce_id"].decode() for records in batch.values() for r in records}
    finally:
        await consumer.stop()


def test_up_runs_everything_stops_cleanly_and_restarts_with_its_data(tmp_path):
    home = tmp_path / "home"
    first = Up(home)
    try:
        lines = first.wait_for(r"Ctrl-C stops everything")
        urls = service_urls(lines)
        assert {"payments", "approvals", "ledger", "reconciliation"} <= set(urls)
        for name, url in urls.items():
            assert httpx.get(f"{url}/healthz").status_code == 200, name
            assert httpx.get(f"{url}/readyz").status_code == 200, name
        state = json.loads((home / "state.json").read_text())
        event_id = asyncio.run(insert_event(state, "ledger"))
    finally:
        code = first.stop()
    assert code == 0
    assert not any(port_open("127.0.0.1", int(url.rsplit(":", 1)[1])) for url in urls.values())

    second = Up(home)
    try:
        lines = second.wait_for(r"Clearhouse is up in")
        assert any("replayed" in line and "ledger" in line for line in lines), lines
        state = json.loads((home / "state.json").read_text())
        broker = f"127.0.0.1:{state['ports']['broker']}"
        assert str(event_id) in asyncio.run(topic_event_ids(broker, "ledger.events"))
    finally:
        assert second.stop() == 0


def test_unreachable_database_is_one_clear_line(tmp_path):
    closed = free_port()
    code, output = Up(tmp_path / "home", CLEARHOUSE_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/postgres"
                      ).finish()
    assert code == 1
    assert f"cannot reach PostgreSQL at 127.0.0.1:{closed}/postgres" in output
    assert "Traceback" not in output


def test_broker_down_at_start_is_one_clear_line(tmp_path):
    closed = free_port()
    code, output = Up(tmp_path / "home", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed}").finish()
    assert code == 1
    assert f"cannot reach the Kafka broker at 127.0.0.1:{closed}" in output
    assert "Traceback" not in output
