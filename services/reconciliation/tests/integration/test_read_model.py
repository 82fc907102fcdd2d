"""The read model of payments and the ledger, built by the consumer from events on the
real broker: each fact applied once however often it arrives, never regressed by a late
older event, and a payload it cannot use parked in the DLQ."""

from __future__ import annotations

import uuid
from datetime import date

from services.reconciliation.tests.integration.harness import (
    Day, eventually, produce, rows, scalar, stored_event,
)
from shared.kafka import ensure_topics


async def test_a_day_of_events_builds_payments_and_ledger_postings_once(settings, sessionmaker, read_model, tenant):
    day = Day(tenant)
    first, second = day.add(12_500), day.add(990, currency="JPY")
    await day.publish(settings)
    # Redelivery of the same facts under new event ids (a producer that re-ran).
    replayed = day.payment_events(first) + day.ledger_events(first)
    await produce(settings.kafka_bootstrap_servers, settings.payments_topic, replayed[:-2])
    await produce(settings.kafka_bootstrap_servers, settings.ledger_topic, replayed[-2:])
    await day.settled(sessionmaker)
    await eventually(lambda: scalar(sessionmaker, "SELECT count(*) = :n FROM processed_events WHERE event_id = ANY(:ids)",
                                    n=len(replayed), ids=[e.id for e in replayed]))
    found = await rows(sessionmaker, "SELECT payment_id, amount, currency, status, value_date FROM rm_payments "
                                     "WHERE tenant_id = :t ORDER BY amount", t=tenant)
    assert [tuple(r) for r in found] == [(second.id, 990, "JPY", "settled", date(2026, 3, 2)),
                                         (first.id, 12_500, "EUR", "settled", date(2026, 3, 2))]
    totals = await rows(sessionmaker, "SELECT payment_id, amount, postings FROM rm_ledger_totals "
                                      "WHERE tenant_id = :t ORDER BY amount", t=tenant)
    # The first payment's posting was told four times (hold.posted and transaction.posted,
    # then both again under new event ids): one transaction, one posting.
    assert sorted((r.payment_id, r.amount, r.postings) for r in totals) == sorted(
        [(second.id, 990, 1), (first.id, 12_500, 1)])
    assert await scalar(sessionmaker, "SELECT count(*) FROM rm_ledger_postings WHERE tenant_id = :t", t=tenant) == 2


async def test_a_late_older_event_never_moves_the_status_back(settings, sessionmaker, read_model, tenant):
    payment_id = str(uuid.uuid4())
    base = {"payment_id": payment_id, "amount": 700, "currency": "EUR", "debit_account_id": "a"}
    settled = stored_event("payment.settled.v1", {**base, "value_date": "2026-03-02"}, tenant_id=tenant,
                           aggregate_type="payment", aggregate_id=payment_id, seq=10)
    submitted = stored_event("payment.submitted.v1", base, tenant_id=tenant, aggregate_type="payment",
                             aggregate_id=payment_id, seq=5)
    await produce(settings.kafka_bootstrap_servers, settings.payments_topic, [settled, submitted])
    marker = stored_event("payment.created.v1", {**base, "payment_id": str(uuid.uuid4())}, tenant_id=tenant,
                          aggregate_type="payment", aggregate_id=payment_id)  # same key: after both
    await produce(settings.kafka_bootstrap_servers, settings.payments_topic, [marker])
    await eventually(lambda: scalar(sessionmaker, "SELECT count(*) = 2 FROM rm_payments WHERE tenant_id = :t",
                                    t=tenant))
    row = (await rows(sessionmaker, "SELECT status, value_date FROM rm_payments WHERE payment_id = :p",
                      p=uuid.UUID(payment_id)))[0]
    assert (row.status, row.value_date) == ("settled", date(2026, 3, 2))


async def test_a_refund_is_recorded_with_its_payment(settings, sessionmaker, read_model, tenant):
    payment_id, refund_id = str(uuid.uuid4()), str(uuid.uuid4())
    event = stored_event("payment.refunded.v1", {"payment_id": payment_id, "refund_id": refund_id, "amount": 300,
                                                 "currency": "EUR", "debit_account_id": "a", "refunded_total": 300,
                                                 "status": "partially_refunded"},
                         tenant_id=tenant, aggregate_type="payment", aggregate_id=payment_id)
    await produce(settings.kafka_bootstrap_servers, settings.payments_topic, [event, event])
    await eventually(lambda: scalar(sessionmaker, "SELECT count(*) FROM rm_refunds WHERE tenant_id = :t", t=tenant))
    refund = (await rows(sessionmaker, "SELECT payment_id, amount, currency FROM rm_refunds WHERE tenant_id = :t",
                         t=tenant))[0]
    assert tuple(refund) == (uuid.UUID(payment_id), 300, "EUR")
    assert await scalar(sessionmaker, "SELECT status FROM rm_payments WHERE payment_id = :p",
                        p=uuid.UUID(payment_id)) == "partially_refunded"


async def test_an_unusable_event_is_parked_and_the_next_one_applied(settings, sessionmaker, read_model, tenant):
    broken_id, good_id = str(uuid.uuid4()), str(uuid.uuid4())
    broken = stored_event("payment.settled.v1", {"payment_id": broken_id, "amount": 100, "currency": "EUR"},
                          tenant_id=tenant, aggregate_type="payment", aggregate_id=broken_id)  # no value_date
    good = stored_event("payment.created.v1", {"payment_id": good_id, "amount": 100, "currency": "EUR"},
                        tenant_id=tenant, aggregate_type="payment", aggregate_id=broken_id)
    await ensure_topics(settings.kafka_bootstrap_servers, [f"{settings.payments_topic}.dlq"])
    await produce(settings.kafka_bootstrap_servers, settings.payments_topic, [broken, good])
    await eventually(lambda: scalar(sessionmaker, "SELECT count(*) = 1 FROM rm_payments WHERE tenant_id = :t",
                                    t=tenant), timeout=60)
    assert await scalar(sessionmaker, "SELECT outcome FROM processed_events WHERE event_id = :e",
                        e=broken.id) == "dead_lettered"


async def test_a_reversal_takes_the_posting_back(settings, sessionmaker, read_model, tenant):
    day = Day(tenant)
    payment = day.add(2_500)
    await day.publish(settings)
    await day.settled(sessionmaker)
    reversal_id = str(uuid.uuid4())
    reversal = stored_event("ledger.transaction.posted.v1", {
        "transaction_id": reversal_id, "payment_id": str(payment.id), "kind": "reversal",
        "reverses_id": str(payment.transaction_id), "posted_at": "2026-03-03T09:00:00+00:00",
        "entries": [{"account_id": "a2", "direction": "debit", "amount": 2_500, "currency": "EUR"},
                    {"account_id": "a1", "direction": "credit", "amount": 2_500, "currency": "EUR"}]},
        tenant_id=tenant, aggregate_type="transaction", aggregate_id=reversal_id)
    await produce(settings.kafka_bootstrap_servers, settings.ledger_topic, [reversal])
    await eventually(lambda: scalar(sessionmaker, "SELECT reversals = 1 FROM rm_ledger_totals WHERE payment_id = :p",
                                    p=payment.id))
    totals = (await rows(sessionmaker, "SELECT amount, postings, value_date FROM rm_ledger_totals "
                                       "WHERE payment_id = :p", p=payment.id))[0]
    assert tuple(totals) == (0, 2, date(2026, 3, 2))
