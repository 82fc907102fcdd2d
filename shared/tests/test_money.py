"""Money is integers in minor units; conversions are exact or refused."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from shared.money import (
    CURRENCY_EXPONENTS, MAX_AMOUNT_MINOR, MAX_MONEY_MINOR, AmountMinor, CurrencyCode, CurrencyMismatch, Money,
    exponent, format_minor, to_minor,
)

currencies = st.sampled_from(sorted(CURRENCY_EXPONENTS))
amounts = st.integers(min_value=1, max_value=MAX_AMOUNT_MINOR)
signed = st.integers(min_value=-MAX_AMOUNT_MINOR, max_value=MAX_AMOUNT_MINOR)
amount_adapter = TypeAdapter(AmountMinor)
currency_adapter = TypeAdapter(CurrencyCode)


class PaymentCreate(BaseModel):
    amount: AmountMinor
    currency: CurrencyCode


def test_exponents_follow_iso_4217():
    assert exponent("JPY") == 0 and exponent("KRW") == 0 and exponent("ISK") == 0
    assert all(exponent(c) == 3 for c in ("KWD", "BHD", "OMR", "JOD", "TND", "LYD", "IQD"))
    assert exponent("CLF") == 4 and exponent("UYW") == 4
    assert exponent("EUR") == exponent("USD") == exponent("GBP") == 2
    assert len(CURRENCY_EXPONENTS) > 150
    assert all(len(c) == 3 and c.isupper() for c in CURRENCY_EXPONENTS)
    with pytest.raises(ValueError):
        exponent("XAU")  # gold has no minor unit: not money we move


@given(amounts)
def test_any_amount_in_range_is_accepted(amount):
    assert amount_adapter.validate_python(amount) == amount
    assert amount_adapter.validate_json(str(amount)) == amount


@given(st.integers(max_value=0) | st.integers(min_value=MAX_AMOUNT_MINOR + 1))
def test_amounts_out_of_range_are_refused(amount):
    with pytest.raises(ValidationError):
        amount_adapter.validate_python(amount)


@given(st.floats(allow_nan=True) | st.booleans() | st.integers(min_value=1, max_value=10**6).map(str)
       | st.decimals(allow_nan=False, allow_infinity=False))
def test_amounts_are_never_floats_bools_strings_or_decimals(value):
    with pytest.raises(ValidationError):
        amount_adapter.validate_python(value)


@pytest.mark.parametrize("raw", ["12.0", "true", '"12"', "1e3"])
def test_amounts_in_json_must_be_integer_literals(raw):
    with pytest.raises(ValidationError):
        amount_adapter.validate_json(raw)


@given(currencies)
def test_every_table_currency_is_a_valid_code(code):
    assert currency_adapter.validate_python(code) == code


@pytest.mark.parametrize(("value", "error_type"), [
    ("eur", "currency_format"), ("EURO", "currency_format"), ("E1R", "currency_format"), ("", "currency_format"),
    ("ABC", "currency_unknown"), ("HRK", "currency_unknown"),  # kuna, withdrawn in 2023
])
def test_bad_currency_codes_get_a_clear_error(value, error_type):
    with pytest.raises(ValidationError) as raised:
        currency_adapter.validate_python(value)
    assert raised.value.errors()[0]["type"] == error_type


def test_request_models_validate_from_json():
    assert PaymentCreate.model_validate_json('{"amount": 1234, "currency": "EUR"}').amount == 1234
    with pytest.raises(ValidationError):
        PaymentCreate.model_validate_json('{"amount": 12.34, "currency": "EUR"}')


@given(signed, currencies)
def test_format_then_parse_round_trips(amount, currency):
    assert to_minor(format_minor(amount, currency), currency) == amount
    assert to_minor(Decimal(format_minor(amount, currency)), currency) == amount


@given(amounts, currencies)
def test_formatted_amounts_have_exactly_the_currency_precision(amount, currency):
    text = format_minor(amount, currency)
    digits = exponent(currency)
    if digits == 0:
        assert "." not in text
    else:
        assert len(text.split(".")[1]) == digits


@given(st.integers(min_value=0, max_value=10**9), currencies, st.integers(min_value=1, max_value=9))
def test_more_precision_than_the_currency_allows_is_refused_not_rounded(whole, currency, extra_digit):
    digits = exponent(currency)
    text = f"{whole}." + "0" * digits + str(extra_digit)
    with pytest.raises(ValueError):
        to_minor(text, currency)


def test_conversion_examples():
    assert to_minor("12.34", "EUR") == 1234
    assert to_minor("12.3", "EUR") == 1230
    assert to_minor("12.340", "EUR") == 1234  # trailing zeros are not extra precision
    assert to_minor("-0.05", "EUR") == -5
    assert to_minor("1000", "JPY") == 1000
    assert to_minor("1.234", "KWD") == 1234
    assert format_minor(1234, "EUR") == "12.34"
    assert format_minor(-5, "EUR") == "-0.05"
    assert format_minor(1000, "JPY") == "1000"
    assert format_minor(12345, "CLF") == "1.2345"


@pytest.mark.parametrize("text", ["", "1,50", "1.", ".5", "1e3", " 1.00", "NaN", "Infinity", "0x10", "1" * 41])
def test_only_plain_decimals_convert(text):
    with pytest.raises(ValueError):
        to_minor(text, "EUR")


def test_conversions_refuse_floats_and_unknown_currencies():
    with pytest.raises(TypeError):
        to_minor(12.34, "EUR")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        format_minor(12.0, "EUR")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        to_minor("1.00", "XTS")


@given(signed, signed, signed, currencies)
def test_money_arithmetic_is_exact(a, b, c, currency):
    x, y, z = Money(a, currency), Money(b, currency), Money(c, currency)
    assert x + y == y + x
    assert (x + y) + z == x + (y + z)
    assert (x + y) - y == x
    assert x - x == Money.zero(currency)
    assert -(-x) == x
    assert (x <= y) == (a <= b) and (x > y) == (a > b)


@given(signed, signed, currencies, currencies)
def test_money_never_mixes_currencies(a, b, first, second):
    if first == second:
        return
    with pytest.raises(CurrencyMismatch):
        Money(a, first) + Money(b, second)
    with pytest.raises(CurrencyMismatch):
        Money(a, first) - Money(b, second)
    with pytest.raises(CurrencyMismatch):
        Money(a, first) < Money(b, second)  # noqa: B015


def test_money_is_a_validated_frozen_value():
    money = Money(1234, "EUR")
    assert str(money) == "12.34 EUR"
    assert money == Money(1234, "EUR") and hash(money) == hash(Money(1234, "EUR"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        money.amount = 1  # type: ignore[misc]
    for amount, currency in [(12.5, "EUR"), (True, "EUR"), ("12", "EUR"), (1, "eur"), (MAX_MONEY_MINOR + 1, "EUR")]:
        with pytest.raises(ValidationError):
            Money(amount, currency)
    with pytest.raises(TypeError):
        money + 1  # type: ignore[operator]
    with pytest.raises(ValidationError):
        Money(MAX_MONEY_MINOR, "EUR") + Money(1, "EUR")  # beyond what a bigint column is promised
