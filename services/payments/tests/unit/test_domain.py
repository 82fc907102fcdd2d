"""The payment state machine, without I/O: only legal transitions happen, each records
one event, a rebuild from the events equals the live object, processor news in any
order and any number of copies settles a payment at most once, and refunds never exceed
what settled."""

from __future__ import annotations

import itertools
import uuid
from datetime import date

import pytest
from hypothesis import given, settings, strategies as st

from services.payments.domain import (
    PAYMENT_TRANSITIONS, IllegalTransition, Payment, PaymentNotCancellable, PaymentStatus, ProcessorState,
    RecordedEvent, Refund, RefundExceedsRefundable, UpdateOutcome,
)

S = PaymentStatus
IBAN = "DE89370400440532013000"


def new_payment(amount: int = 10_000) -> Payment:
    return Payment.create(id=uuid.uuid4(), tenant_id="t1", amount=amount, currency="EUR", debit_account_id="acct_1",
                          reference="ref", metadata={}, payee_name="Jane Doe", payee_iban=IBAN, created_by="alice")


def replayed(payment: Payment, events) -> Payment:
    return Payment.replay(id=payment.id, tenant_id=payment.tenant_id,
                          events=[RecordedEvent(e.type, e.payload, e.occurred_at) for e in events])


STATE = ("status", "amount", "currency", "debit_account_id", "reference", "metadata", "payee_name_masked",
         "payee_iban_masked", "created_by", "failure_reason", "cancellation_reason", "approval_id", "hold_id",
         "processor", "processor_payment_id", "value_date", "refunded_amount", "version", "created_at", "updated_at")


def snapshot(payment: Payment) -> dict:
    return {name: getattr(payment, name) for name in STATE}


def news(state: ProcessorState) -> dict:
    return dict(state=state, processor="sandbox", processor_payment_id="po_1", value_date=date(2025, 1, 31),
                failure_reason="processor_declined" if state is ProcessorState.FAILED else None)


# Every command a payment can be sent, legal or not in the state it finds.
COMMANDS = {
    "approve": lambda p: p.approve(approval_id="apr_1"),
    "reject": lambda p: p.reject(approval_id="apr_1", expired=False),
    "reserve": lambda p: p.reserve_funds(hold_id="hold_1"),
    "submit": lambda p: p.submit(processor="sandbox", processor_payment_id="po_1"),
    "settle": lambda p: p.settle(value_date=date(2025, 1, 31)),
    "fail": lambda p: p.fail(failure_reason="insufficient_funds"),
    "cancel": lambda p: p.cancel(reason="changed my mind", submission_started=False),
    "cancel_in_flight": lambda p: p.cancel(reason=None, submission_started=True),
    "processing": lambda p: p.apply_processor_state(**news(ProcessorState.PROCESSING)),
    "succeeded": lambda p: p.apply_processor_state(**news(ProcessorState.SUCCEEDED)),
    "failed": lambda p: p.apply_processor_state(**news(ProcessorState.FAILED)),
    "refund_part": lambda p: p.record_refund(refund_id=uuid.uuid4(), amount=2_500),
    "refund_rest": lambda p: p.record_refund(refund_id=uuid.uuid4(), amount=p.amount - p.refunded_amount),
}


@settings(max_examples=400)
@given(st.lists(st.sampled_from(sorted(COMMANDS)), max_size=25))
def test_any_sequence_of_commands_keeps_the_invariants(commands):
    payment = new_payment()
    recorded = list(payment.events)
    settled_count = 0
    for command in commands:
        before = payment.status
        try:
            COMMANDS[command](payment)
        except IllegalTransition:
            assert len(payment.events) == len(recorded) and payment.status is before  # refused whole
        new = payment.events[len(recorded):]
        recorded = list(payment.events)
        status = before
        for event in new:  # a command may make several moves (news of settlement implies acceptance)
            assert event.payload["payment_id"] == str(payment.id)
            assert event.tenant_id == "t1" and event.aggregate_id == str(payment.id)
            after = S(event.payload["status"])
            assert after is status or after in PAYMENT_TRANSITIONS[status], (status, after, command)
            status = after
            settled_count += event.type == "payment.settled.v1"
        assert status is payment.status
        # Money never leaves before it is reserved.
        if payment.status in (S.SUBMITTED, S.SETTLED, S.PARTIALLY_REFUNDED, S.REFUNDED):
            assert payment.hold_id is not None and payment.approval_id is not None
        assert 0 <= payment.refunded_amount <= payment.amount
        assert (payment.status is S.REFUNDED) == (payment.refunded_amount == payment.amount)
    assert settled_count <= 1
    assert snapshot(replayed(payment, payment.events)) == snapshot(payment)
    assert payment.version == len(payment.events)


def test_failed_commands_record_nothing():
    payment = new_payment()
    with pytest.raises(IllegalTransition):
        payment.settle(value_date=date(2025, 1, 1))
    assert [e.type for e in payment.events] == ["payment.created.v1"]
    assert payment.status is S.PENDING_APPROVAL


def submitted_payment() -> Payment:
    payment = new_payment()
    payment.approve(approval_id="apr_1")
    payment.reserve_funds(hold_id="hold_1")
    return payment


@settings(max_examples=300)
@given(st.lists(st.sampled_from([ProcessorState.PROCESSING, ProcessorState.SUCCEEDED]), min_size=1, max_size=12)
       .filter(lambda xs: ProcessorState.SUCCEEDED in xs))
def test_processor_news_in_any_order_and_number_settles_once(sequence):
    payment = submitted_payment()
    outcomes = [payment.apply_processor_state(**news(state)) for state in sequence]
    types = [e.type for e in payment.events]
    assert payment.status is S.SETTLED
    assert types.count("payment.settled.v1") == 1 and types.count("payment.submitted.v1") == 1
    first_final = sequence.index(ProcessorState.SUCCEEDED)
    assert outcomes[first_final] is UpdateOutcome.APPLIED
    for state, outcome in list(zip(sequence, outcomes))[first_final + 1:]:
        expected = UpdateOutcome.DUPLICATE if state is ProcessorState.SUCCEEDED else UpdateOutcome.STALE
        assert outcome is expected


@pytest.mark.parametrize("first, then", itertools.permutations([ProcessorState.SUCCEEDED, ProcessorState.FAILED]))
def test_the_first_final_word_stands_and_the_other_is_a_conflict(first, then):
    payment = submitted_payment()
    payment.apply_processor_state(**news(first))
    status = payment.status
    assert payment.apply_processor_state(**news(then)) is UpdateOutcome.CONFLICT
    assert payment.status is status


@pytest.mark.parametrize("status_maker", [
    lambda p: None,  # pending approval
    lambda p: p.approve(approval_id="a"),  # approved, no hold: never submitted
    lambda p: p.cancel(reason=None, submission_started=False),
])
def test_news_about_a_payment_never_sent_is_a_conflict(status_maker):
    payment = new_payment()
    status_maker(payment)
    before = payment.status
    assert payment.apply_processor_state(**news(ProcessorState.SUCCEEDED)) is UpdateOutcome.CONFLICT
    assert payment.status is before


def test_cancel_only_before_anything_reached_the_processor():
    payment = submitted_payment()
    with pytest.raises(PaymentNotCancellable):
        payment.cancel(reason=None, submission_started=True)
    payment.cancel(reason="stop", submission_started=False)
    assert payment.status is S.CANCELLED
    assert payment.events[-1].payload["hold_id"] == "hold_1"  # the ledger voids it


@settings(max_examples=300)
@given(st.integers(min_value=1, max_value=10**6), st.lists(st.integers(min_value=1, max_value=10**6), max_size=10))
def test_refunds_never_exceed_the_settled_amount(amount, requests):
    payment = new_payment(amount)
    payment.approve(approval_id="a")
    payment.reserve_funds(hold_id="h")
    payment.apply_processor_state(**news(ProcessorState.SUCCEEDED))
    open_refunds = 0
    for requested in requests:
        try:
            refund = Refund.create(id=uuid.uuid4(), payment=payment, amount=requested, reason=None,
                                   created_by="alice", open_refunds=open_refunds)
        except RefundExceedsRefundable:
            assert requested > payment.amount - payment.refunded_amount - open_refunds
            continue
        except IllegalTransition:
            assert payment.status is S.REFUNDED
            continue
        refund.apply_processor_state(ProcessorState.SUCCEEDED, processor_refund_id="re_1", failure_reason=None,
                                     payment=payment)
        assert refund.status == "succeeded"
    assert payment.refunded_amount <= payment.amount
    assert sum(e.payload["amount"] for e in payment.events if e.type == "payment.refunded.v1") == \
        payment.refunded_amount
    assert snapshot(replayed(payment, payment.events)) == snapshot(payment)


def test_refund_lifecycle_events_and_rebuild():
    payment = submitted_payment()
    payment.apply_processor_state(**news(ProcessorState.SUCCEEDED))
    refund = Refund.create(id=uuid.uuid4(), payment=payment, amount=4_000, reason="late", created_by="alice",
                           open_refunds=0)
    assert refund.apply_processor_state(ProcessorState.PROCESSING, processor_refund_id="re_1", failure_reason=None,
                                        payment=payment) is UpdateOutcome.APPLIED
    assert refund.apply_processor_state(ProcessorState.SUCCEEDED, processor_refund_id="re_1", failure_reason=None,
                                        payment=payment) is UpdateOutcome.APPLIED
    assert refund.apply_processor_state(ProcessorState.PROCESSING, processor_refund_id="re_1", failure_reason=None,
                                        payment=payment) is UpdateOutcome.STALE
    assert [e.type for e in refund.events] == ["refund.created.v1", "refund.submitted.v1", "refund.succeeded.v1"]
    assert payment.status is S.PARTIALLY_REFUNDED and payment.refunded_amount == 4_000
    rebuilt = Refund.replay(id=refund.id, tenant_id="t1",
                            events=[RecordedEvent(e.type, e.payload, e.occurred_at) for e in refund.events])
    assert (rebuilt.status, rebuilt.amount, rebuilt.processor_refund_id, rebuilt.version) == (
        refund.status, refund.amount, refund.processor_refund_id, refund.version)


def test_events_carry_masked_payee_only():
    payment = new_payment()
    created = payment.events[0].payload
    assert created["payee"] == {"name": "J*** D**", "iban": "DE89********3000"}
    assert IBAN not in repr(payment.events) and "Jane" not in repr(payment.events)


def test_unknown_event_types_from_later_versions_are_skipped_on_replay():
    payment = new_payment()
    events = [RecordedEvent(e.type, e.payload, e.occurred_at) for e in payment.events]
    events.append(RecordedEvent("payment.annotated.v1", {"payment_id": str(payment.id)}, events[0].occurred_at))
    assert snapshot(Payment.replay(id=payment.id, tenant_id="t1", events=events)) == snapshot(payment)
