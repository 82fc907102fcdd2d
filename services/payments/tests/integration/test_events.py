"""Events in and out over the real broker: what the relay publishes matches the event
contract (docs/events.md) and carries no plaintext PII; what the consumer cannot read is
parked in the DLQ; another tenant's decision never touches a payment."""

from __future__ import annotations

import uuid

import orjson
import pytest

from services.payments.schemas import EVENT_SCHEMAS
from services.payments.tests.integration.harness import IBAN, PAYEE_NAME, produce, running_flow, scalar
from shared.relay import Relay
from shared.tests.conftest import read_topic


@pytest.fixture(scope="module")
async def flow(db, platform, internal_keys, sessionmaker, tmp_path_factory):
    async with running_flow(db, platform, internal_keys, sessionmaker, tmp_path_factory.mktemp("events")) as found:
        yield found


async def test_published_events_follow_the_contract(flow, db, platform):
    settled = (await flow.create(payee={"name": PAYEE_NAME, "iban": IBAN}))["id"]
    await flow.approved_and_reserved(settled)
    await flow.wait_status(settled, "settled")
    failed = (await flow.create())["id"]
    await flow.grant(failed)
    await flow.wait_status(failed, "approved")
    await flow.refuse_hold(failed)
    await flow.wait_status(failed, "failed")

    service = f"payments{uuid.uuid4().hex[:6]}"  # a topic of this test's own
    relay = Relay(service=service, database_url=db.app_url, bootstrap=platform.bootstrap)
    published = await relay.replay()
    records = await read_topic(platform.bootstrap, f"{service}.events", expect=published)
    assert len(records) >= published > 0
    mine = [r for r in records if r.key.decode() in (settled, failed)]
    types = {(r.key.decode(), dict(r.headers)["ce_type"].decode()) for r in mine}
    assert {(settled, t) for t in ("payment.created.v1", "payment.approved.v1", "payment.submitted.v1",
                                   "payment.settled.v1")} <= types
    assert {(failed, "payment.failed.v1")} <= types
    for record in records:
        event_type = dict(record.headers)["ce_type"].decode()
        payload = orjson.loads(record.value)
        EVENT_SCHEMAS[event_type].model_validate(payload)  # every field the contract promises
        assert IBAN.encode() not in record.value and PAYEE_NAME.encode() not in record.value
        if event_type.startswith("payment."):
            assert payload["payment_id"] == record.key.decode()
    failure = next(orjson.loads(r.value) for r in mine if dict(r.headers)["ce_type"] == b"payment.failed.v1")
    assert failure["failure_reason"] == "insufficient_funds"


async def test_an_unreadable_event_goes_to_the_dlq_and_the_next_is_applied(flow, platform):
    poison = await produce(platform.bootstrap, flow.settings.ledger_topic, "ledger.hold.placed.v1",
                           {"hold_id": "h1"}, aggregate_type="hold")  # no payment_id
    pid = (await flow.create())["id"]
    await flow.grant(pid)
    await flow.wait_status(pid, "approved")
    dead = await read_topic(platform.bootstrap, f"{flow.settings.ledger_topic}.dlq", expect=1)
    assert [dict(r.headers)["ce_id"].decode() for r in dead] == [str(poison)]
    assert b"payment_id" in dict(dead[0].headers)["dlq_error"]


async def test_unknown_types_are_ignored_and_foreign_tenants_cannot_decide(flow, platform):
    pid = (await flow.create(tenant="t1"))["id"]
    ignored = await produce(platform.bootstrap, flow.settings.approvals_topic, "approval.requested.v1",
                            {"approval_id": "a", "payment_id": pid})
    foreign = await flow.grant(pid, tenant="t2")  # the same id under another tenant names nothing
    await flow.consumed(ignored, foreign)
    assert (await flow.get(pid))["status"] == "pending_approval"
    outcome = await scalar(flow.sessionmaker, "SELECT outcome FROM processed_events WHERE event_id = :id",
                           id=ignored)
    assert outcome == "ignored"
