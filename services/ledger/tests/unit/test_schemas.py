"""Request validation helpers: RFC 3339 instants and storable text."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from services.ledger.schemas import Description, Metadata, Rfc3339

instants = TypeAdapter(Rfc3339)


@given(moment=st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31),
                           timezones=st.just(timezone.utc)))
def test_rfc3339_round_trips_every_instant(moment):
    assert instants.validate_python(moment.isoformat()) == moment
    assert instants.validate_python(moment.isoformat().replace("+00:00", "Z")) == moment


@given(value=st.one_of(st.integers(), st.floats(), st.text(max_size=30)))
def test_anything_else_is_a_validation_error_never_a_crash(value):
    try:
        parsed = instants.validate_python(value)
    except ValidationError:
        return
    assert parsed.tzinfo is not None


@given(text=st.text())
def test_text_is_storable_or_refused(text):
    try:
        TypeAdapter(Description).validate_python(text)
    except ValidationError:
        assert len(text) > 1000 or any(ord(c) < 32 and c not in "\t\n" or 0x7F <= ord(c) <= 0x9F
                                       or 0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    text.encode("utf-8")  # what PostgreSQL will store
    assert "\x00" not in text


def test_metadata_is_flat_strings():
    adapter = TypeAdapter(Metadata)
    assert adapter.validate_python({"order": "42"}) == {"order": "42"}
    for bad in ({"n": 1}, {"nested": {"a": "b"}}, {"": "x"}, {f"k{i}": "v" for i in range(51)}):
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)


def test_the_public_transaction_kind_names_every_kind_the_domain_posts():
    from typing import get_args

    from services.ledger.domain import TransactionKind
    from services.ledger.schemas import TransactionPublic

    assert set(get_args(TransactionPublic.model_fields["kind"].annotation)) == {k.value for k in TransactionKind}
