"""payment.created through the real broker into the consumer, and the approval events out
through the relay onto the real broker: auto-approval, a request opened for people, and
duplicates of every kind applied once."""

from __future__ import annotations

import asyncio
import uuid

import orjson

from services.approvals.tests.integration.conftest import (
    consuming, eventually, events_of, payment_created, produce, read_topic, rows, scalar,
)
from services.approvals.verify import verify
from shared.kafka import ensure_topics
from shared.relay import Relay


async def request_for(sessionmaker, tenant, payment_id):
    return await scalar(sessionmaker, "SELECT id FROM approval_requests WHERE tenant_id = :t AND subject_id = :p",
                        t=tenant, p=payment_id)


async def test_payments_flow_through_the_broker_and_out_again(platform, database, broker_settings, sessionmaker, http,
                                                             as_, tenant):
    small = payment_created(tenant, amount=99_999, maker="mia")  # 999.99 EUR: the policy approves
    large = payment_created(tenant, amount=1_500_000, maker="mia")  # 15,000.00 EUR: two people
    await produce(platform.bootstrap, broker_settings.payments_topic, small, large)

    async with consuming(broker_settings, sessionmaker):
        auto_id = await eventually(lambda: request_for(sessionmaker, tenant, small.aggregate_id), timeout=30)
        open_id = await eventually(lambda: request_for(sessionmaker, tenant, large.aggregate_id), timeout=30)

    auto_events = await events_of(sessionmaker, auto_id)
    assert [(e.type, e.actor) for e in auto_events] == [("approval.granted.v1", "system:policy")]
    assert "auto_below_1000" in auto_events[0].reason
    assert auto_events[0].payload["auto"] is True and auto_events[0].payload["payment_id"] == small.aggregate_id
    assert auto_events[0].correlation_id == small.correlation_id

    requested = (await events_of(sessionmaker, open_id))[0]
    assert requested.type == "approval.requested.v1" and requested.actor == "service:approvals"
    assert {k: requested.payload[k] for k in ("payment_id", "required_approvals", "policy_version", "rule", "maker",
                                               "amount", "currency")} == {
        "payment_id": large.aggregate_id, "required_approvals": 2, "policy_version": 0,
        "rule": "two_approvers_from_10000", "maker": "mia", "amount": 1_500_000, "currency": "EUR"}
    for checker in ("checker-1", "checker-2"):
        response = await http.post(f"/v1/approvals/{open_id}/decisions", json={"decision": "approve", "reason": "ok"},
                                   headers=as_(checker))
        assert response.status_code == 201

    # The relay publishes the log onto the broker, where payments would consume it.
    relay_service = f"approvals{uuid.uuid4().hex[:8]}"
    await ensure_topics(platform.bootstrap, [f"{relay_service}.events", f"{relay_service}.events.dlq"], partitions=3)
    relay = Relay(service=relay_service, database_url=database.app_url, bootstrap=platform.bootstrap,
                  poll_interval_s=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await eventually(lambda: scalar(sessionmaker, "SELECT count(*) = 0 FROM events WHERE published_at IS NULL"),
                         timeout=30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    records = await read_topic(platform.bootstrap, f"{relay_service}.events", expect=5)
    ours = [(dict(r.headers)["ce_type"].decode(), orjson.loads(r.value)) for r in records
            if dict(r.headers).get("ce_tenantid") == tenant.encode()]
    by_payment = {}
    for event_type, data in ours:
        by_payment.setdefault(data["payment_id"], []).append(event_type)
    assert by_payment[small.aggregate_id] == ["approval.granted.v1"]
    assert by_payment[large.aggregate_id] == ["approval.requested.v1", "approval.decided.v1", "approval.decided.v1",
                                              "approval.granted.v1"]
    assert await verify(database.app_url) == []


async def test_duplicate_payment_created_opens_one_request(platform, broker_settings, sessionmaker, tenant):
    original = payment_created(tenant, amount=1_200_000)
    # Redelivered (same event id) and re-produced (a new event id for the same payment).
    again = payment_created(tenant, amount=1_200_000, payment_id=original.aggregate_id)
    marker = payment_created(tenant, amount=100)  # processed after the duplicates on its partition or another
    await produce(platform.bootstrap, broker_settings.payments_topic, original, original, again, original, marker)

    async with consuming(broker_settings, sessionmaker) as consumer:
        await eventually(lambda: request_for(sessionmaker, tenant, marker.aggregate_id), timeout=30)
        await eventually(lambda: scalar(
            sessionmaker, "SELECT count(*) = 3 FROM processed_events WHERE consumer = :c AND event_id = ANY(:ids)",
            c=consumer.name, ids=[original.id, again.id, marker.id]))

    assert await scalar(sessionmaker, "SELECT count(*) FROM approval_requests WHERE tenant_id = :t AND subject_id = :p",
                        t=tenant, p=original.aggregate_id) == 1
    approval_id = await request_for(sessionmaker, tenant, original.aggregate_id)
    assert [e.type for e in await events_of(sessionmaker, approval_id)] == ["approval.requested.v1"]


async def test_a_payment_created_without_a_maker_is_parked_not_guessed(platform, broker_settings, sessionmaker, tenant):
    nameless = payment_created(tenant, amount=100_000, maker=None, actor="service:payments")
    # Same key, so the follower waits behind the bad message on its partition.
    follower = payment_created(tenant, amount=100_000, key=nameless.aggregate_id)
    await produce(platform.bootstrap, broker_settings.payments_topic, nameless, follower)

    async with consuming(broker_settings, sessionmaker):
        await eventually(lambda: request_for(sessionmaker, tenant, follower.payload["payment_id"]), timeout=60)

    assert await request_for(sessionmaker, tenant, nameless.payload["payment_id"]) is None
    assert await scalar(sessionmaker, "SELECT outcome FROM processed_events WHERE event_id = :id",
                        id=nameless.id) == "dead_lettered"
    dead = await read_topic(platform.bootstrap, f"{broker_settings.payments_topic}.dlq", expect=1)
    assert b"names no maker" in dict(dead[-1].headers)["dlq_error"]


async def test_a_run_of_payment_created_is_opened_as_one_would_be_one_by_one(
        platform, broker_settings, sessionmaker, http, as_, tenant):
    """The consumer's batch path: one tenant on the default policy, one whose stored
    policy the consumer has not cached yet (its guess is stale, so those requests are
    opened again alone, under the current version), a duplicate inside the run, and each
    approval event caused by its own payment.created."""
    relaxed = {"reason": "one approver from 50,000 only", "rules": [
        {"name": "one_from_50k", "required_approvals": 1,
         "conditions": {"amount_at_least": {"whole_major_units": 50_000}}},
        {"name": "auto_otherwise", "required_approvals": 0}]}
    assert (await http.put("/v1/approvals/policies/payment", json=relaxed, headers=as_("admin"))).status_code == 200
    other = f"{tenant}-default"
    key = str(uuid.uuid4())  # one key: one partition, so the run arrives together and in order
    stored_policy = [payment_created(tenant, amount=amount, key=key) for amount in (200_000, 9_000_000)]
    default = [payment_created(other, amount=amount, key=key) for amount in (200_000, 50_000)]
    duplicate = payment_created(other, amount=50_000, payment_id=default[1].payload["payment_id"], key=key)
    sent = [stored_policy[0], default[0], default[1], duplicate, stored_policy[1]]
    await produce(platform.bootstrap, broker_settings.payments_topic, *sent)

    async with consuming(broker_settings, sessionmaker) as consumer:
        await eventually(lambda: scalar(
            sessionmaker, "SELECT count(*) = 5 FROM processed_events WHERE consumer = :c AND event_id = ANY(:ids)",
            c=consumer.name, ids=[e.id for e in sent]), timeout=30)

    async def opened(event):
        [row] = await rows(sessionmaker, "SELECT id, status, policy_version, rule FROM approval_requests "
                                         "WHERE tenant_id = :t AND subject_id = :p",
                           t=event.tenant_id, p=event.payload["payment_id"])
        return row
    assert [(r.status, r.policy_version, r.rule) for r in [await opened(e) for e in stored_policy]] == [
        ("granted", 1, "auto_otherwise"), ("pending", 1, "one_from_50k")]
    assert [(r.status, r.policy_version) for r in [await opened(e) for e in default]] == [
        ("pending", 0), ("granted", 0)]
    for event in [*stored_policy, *default]:
        [written] = await rows(sessionmaker, "SELECT causation_id, correlation_id FROM events "
                                             "WHERE aggregate_id = :id", id=str((await opened(event)).id))
        assert written.causation_id == str(event.id)
    assert await rows(sessionmaker, "SELECT type, aggregate_id, payload FROM events WHERE causation_id = :id",
                      id=str(duplicate.id)) == []
