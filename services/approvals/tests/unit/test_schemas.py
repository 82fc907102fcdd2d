"""The API's models refuse what the domain or PostgreSQL could not take, and cursors are
opaque: anything but one this API returned is a 400, never an exception."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime, timezone

import pytest
from hypothesis import given, strategies as st
from pydantic import ValidationError

from services.approvals import service
from services.approvals.repository import PageCursor
from services.approvals.schemas import ApprovalCreate, DecisionCreate, PolicyUpdate


@pytest.mark.parametrize("body", [
    {"subject_type": "payment", "subject_id": "p1"},  # payments come from payment.created only
    {"subject_type": "payee", "subject_id": "p1", "amount": 100},  # an amount without its currency
    {"subject_type": "payee", "subject_id": "p1", "amount": 1.5, "currency": "EUR"},
    {"subject_type": "payee", "subject_id": "p1", "amount": "100", "currency": "EUR"},
    {"subject_type": "payee", "subject_id": "p1", "currency": "eur", "amount": 1},
    {"subject_type": "Payee", "subject_id": "p1"},
    {"subject_type": "payee", "subject_id": "nul\x00"},
    {"subject_type": "payee", "subject_id": "p1", "metadata": {"k": "\ud800"}},
    {"subject_type": "payee", "subject_id": "p1", "surprise": True},
])
def test_approval_requests_are_validated_strictly(body):
    with pytest.raises(ValidationError):
        ApprovalCreate.model_validate(body)


def test_decisions_are_validated_strictly():
    assert DecisionCreate.model_validate({"decision": "approve"}).reason is None
    for body in ({"decision": "reject"}, {"decision": "reject", "reason": "   "}, {"decision": "maybe"},
                 {"decision": "approve", "reason": "x" * 501}):
        with pytest.raises(ValidationError):
            DecisionCreate.model_validate(body)


def test_a_policy_update_must_decide_every_subject():
    good = {"reason": "r", "rules": [{"name": "all", "required_approvals": 1}]}
    assert PolicyUpdate.model_validate(good).domain_rules()[0].name == "all"
    for bad in ({**good, "rules": [{"name": "x", "required_approvals": 1, "conditions": {"currencies": ["EUR"]}}]},
                {**good, "rules": [{"name": "x", "required_approvals": True}]},
                {**good, "expire_after_seconds": 600, "escalate_after_seconds": 600},
                {**good, "rules": [{"name": "x", "required_approvals": 1,
                                    "conditions": {"amount_at_least": {}}}, {"name": "y", "required_approvals": 0}]}):
        with pytest.raises(ValidationError):
            PolicyUpdate.model_validate(bad)


@given(created_at=st.datetimes(timezones=st.just(timezone.utc)), approval_id=st.uuids())
def test_a_cursor_decodes_to_what_it_encoded(created_at, approval_id):
    cursor = PageCursor(created_at, approval_id)
    assert service.decode_cursor(service.encode_cursor(cursor)) == cursor


@given(garbage=st.text(max_size=200) | st.binary(max_size=120).map(lambda b: base64.urlsafe_b64encode(b).decode()))
def test_anything_else_is_an_invalid_cursor(garbage):
    try:
        cursor = service.decode_cursor(garbage)
    except service.InvalidCursor:
        return
    assert isinstance(cursor.id, uuid.UUID) and isinstance(cursor.created_at, datetime)
    assert cursor.created_at.tzinfo is not None
