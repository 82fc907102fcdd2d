"""What an operator may see of personal and secret data: the masks every service uses."""

from __future__ import annotations

import time

import pytest

from shared.redaction import (
    REDACTED,
    is_valid_iban,
    mask_account_number,
    mask_iban,
    mask_name,
    redact,
    scrub_text,
)

IBAN = "DE89370400440532013000"


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        (IBAN, "DE89********3000"),
        ("DE89 3704 0044 0532 0130 00", "DE89********3000"),
        ("gb82west12345698765432", "GB82********5432"),
        ("DE89", "********"),  # too short to show any of it
    ],
)
def test_iban_keeps_country_check_digits_and_last_four(value, masked):
    assert mask_iban(value) == masked


def test_names_keep_initials_and_account_numbers_their_last_four():
    assert mask_name("Jane Doe") == "J*** D**"
    assert mask_name("  Zoë  van der Berg ") == "Z** v** d** B***"
    assert mask_account_number("0532013000") == "********3000"
    assert mask_account_number("1234") == "********"


def test_redact_judges_fields_by_name_and_leaves_the_input_alone():
    payment = {
        "amount": 1200,
        "reference": "INV-7",
        "name": "Operating account",  # a label, not a person
        "payee": {"name": "Jane Doe", "iban": IBAN},
        "X-Api-Key": "sk_live_1",
        "credentials": {"password": "hunter2", "client_secret": {"nested": "x"}},
        "tokens": ["a", "b"],
        "debtor_iban": IBAN,
    }
    assert redact(payment) == {
        "amount": 1200,
        "reference": "INV-7",
        "name": "Operating account",
        "payee": {"name": "J*** D**", "iban": "DE89********3000"},
        "X-Api-Key": REDACTED,
        "credentials": {"password": REDACTED, "client_secret": REDACTED},
        "tokens": REDACTED,
        "debtor_iban": "DE89********3000",
    }
    assert payment["payee"]["iban"] == IBAN


def test_free_text_loses_ibans_sql_parameters_and_credentials_only():
    text = (
        f"payee DE89 3704 0044 0532 0130 00 AB rejected; id AB12345678901234 kept\n"
        f"[SQL: INSERT INTO payees VALUES ($1)]\n[parameters: ('{IBAN}', 'Jane [x]')]\n"
        "dsn postgresql://app:s3cret@db/payments?sslpassword=p2 GET /x?access_token=t0k&n=1"
    )
    assert scrub_text(text) == (
        "payee DE89********3000 AB rejected; id AB12345678901234 kept\n"
        "[SQL: INSERT INTO payees VALUES ($1)]\n[parameters: hidden]\n"
        f"dsn postgresql://app:{REDACTED}@db/payments?sslpassword={REDACTED} GET /x?access_token={REDACTED}&n=1"
    )
    assert is_valid_iban(IBAN) and not is_valid_iban("DE00370400440532013000")


@pytest.mark.parametrize("hostile", ["token" * 20_000, "[parameters: " * 10_000, "DE89 " * 20_000, "a" * 100_000])
def test_scrubbing_stays_linear_on_hostile_input(hostile):
    # Every log line and span passes here: a pattern that backtracks quadratically would
    # let one odd value stall a process (these inputs took seconds with naive patterns).
    started = time.perf_counter()
    scrub_text(hostile)
    assert time.perf_counter() - started < 1.0
