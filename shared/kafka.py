"""Broker plumbing shared by the relay and the consumers: client factories with the
settings every Clearhouse client must use, and explicit topic creation.

Tansu (the embedded broker) does not support the idempotent producer, and both Tansu and
real Kafka are targets, so idempotence stays off: exactly-once effects come from the
outbox and the inbox, not from the broker.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)

SERVICES = ("payments", "approvals", "ledger", "reconciliation")
DEFAULT_PARTITIONS = 6


def service_topics() -> list[str]:
    topics = []
    for service in SERVICES:
        topics += [f"{service}.events", f"{service}.events.dlq"]
    return topics


def make_producer(bootstrap: str, **overrides) -> AIOKafkaProducer:
    options = dict(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=False,
        linger_ms=1,
        max_batch_size=256 * 1024,
        request_timeout_ms=10_000,
        retry_backoff_ms=100,
        client_id="clearhouse",
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(bootstrap: str, *topics: str, group_id: str, **overrides) -> AIOKafkaConsumer:
    options = dict(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=500,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        client_id=group_id,
    )
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def missing_topics(bootstrap: str, topics: list[str]) -> list[str]:
    """Which of `topics` the broker does not have (listing never creates a topic)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        return [t for t in topics if t not in existing]
    finally:
        await admin.close()


async def ensure_topics(bootstrap: str, topics: list[str], partitions: int = DEFAULT_PARTITIONS) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created (a fresh broker
    answers with all of them, which is how a relay learns that it must replay)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                await admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass
            # Metadata converges asynchronously on some brokers; wait until it is visible.
            for _ in range(50):
                if set(missing) <= set(await admin.list_topics()):
                    break
                await asyncio.sleep(0.1)
        return missing
    finally:
        await admin.close()
