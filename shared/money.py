"""Money as integer minor units with an ISO 4217 currency: the only place that knows how
many decimals a currency has and the only place that converts between "12.34" and 1234.

Never a float, never rounding: a decimal string with more precision than its currency
allows is refused, not rounded. Amounts are strict ints (no bools, no numeric strings),
bounded so that sums of many of them still fit PostgreSQL's bigint.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, Field, Strict, WithJsonSchema
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

# Largest single amount, in minor units: 10^15 is ten trillion in a two-decimal currency.
# bigint holds ~9.2 * 10^18, so thousands of maximal amounts can be summed in a balance.
MAX_AMOUNT_MINOR = 10**15
# Bound for a `Money` value, which may also be a (signed) balance or total.
MAX_MONEY_MINOR = 10**18

# ISO 4217 list one (published 2026-01-01): every active code with a defined number of
# minor units, funds codes included (CLF, UYW ...). Codes whose minor unit is "N.A."
# (XAU, XAG, XPT, XPD, XDR, XSU, XUA, XBA-XBD, XTS and the "no currency" code) are not money we move.
# Withdrawn codes (ANG -> XCG, BGN -> EUR, HRK, SLL, ZWL, CUC) are gone on purpose.
CURRENCY_EXPONENTS: dict[str, int] = {
    "AED": 2, "AFN": 2, "ALL": 2, "AMD": 2, "AOA": 2, "ARS": 2, "AUD": 2, "AWG": 2, "AZN": 2,
    "BAM": 2, "BBD": 2, "BDT": 2, "BHD": 3, "BIF": 0, "BMD": 2, "BND": 2, "BOB": 2, "BOV": 2,
    "BRL": 2, "BSD": 2, "BTN": 2, "BWP": 2, "BYN": 2, "BZD": 2,
    "CAD": 2, "CDF": 2, "CHE": 2, "CHF": 2, "CHW": 2, "CLF": 4, "CLP": 0, "CNY": 2, "COP": 2,
    "COU": 2, "CRC": 2, "CUP": 2, "CVE": 2, "CZK": 2,
    "DJF": 0, "DKK": 2, "DOP": 2, "DZD": 2,
    "EGP": 2, "ERN": 2, "ETB": 2, "EUR": 2,
    "FJD": 2, "FKP": 2,
    "GBP": 2, "GEL": 2, "GHS": 2, "GIP": 2, "GMD": 2, "GNF": 0, "GTQ": 2, "GYD": 2,
    "HKD": 2, "HNL": 2, "HTG": 2, "HUF": 2,
    "IDR": 2, "ILS": 2, "INR": 2, "IQD": 3, "IRR": 2, "ISK": 0,
    "JMD": 2, "JOD": 3, "JPY": 0,
    "KES": 2, "KGS": 2, "KHR": 2, "KMF": 0, "KPW": 2, "KRW": 0, "KWD": 3, "KYD": 2, "KZT": 2,
    "LAK": 2, "LBP": 2, "LKR": 2, "LRD": 2, "LSL": 2, "LYD": 3,
    "MAD": 2, "MDL": 2, "MGA": 2, "MKD": 2, "MMK": 2, "MNT": 2, "MOP": 2, "MRU": 2, "MUR": 2,
    "MVR": 2, "MWK": 2, "MXN": 2, "MXV": 2, "MYR": 2, "MZN": 2,
    "NAD": 2, "NGN": 2, "NIO": 2, "NOK": 2, "NPR": 2, "NZD": 2,
    "OMR": 3,
    "PAB": 2, "PEN": 2, "PGK": 2, "PHP": 2, "PKR": 2, "PLN": 2, "PYG": 0,
    "QAR": 2,
    "RON": 2, "RSD": 2, "RUB": 2, "RWF": 0,
    "SAR": 2, "SBD": 2, "SCR": 2, "SDG": 2, "SEK": 2, "SGD": 2, "SHP": 2, "SLE": 2, "SOS": 2,
    "SRD": 2, "SSP": 2, "STN": 2, "SVC": 2, "SYP": 2, "SZL": 2,
    "THB": 2, "TJS": 2, "TMT": 2, "TND": 3, "TOP": 2, "TRY": 2, "TTD": 2, "TWD": 2, "TZS": 2,
    "UAH": 2, "UGX": 0, "USD": 2, "USN": 2, "UYI": 0, "UYU": 2, "UYW": 4, "UZS": 2,
    "VED": 2, "VES": 2, "VND": 0, "VUV": 0,
    "WST": 2,
    "XAD": 2, "XAF": 0, "XCD": 2, "XCG": 2, "XOF": 0, "XPF": 0,
    "YER": 2,
    "ZAR": 2, "ZMW": 2, "ZWG": 2,
}

_DECIMAL = re.compile(r"([+-]?)([0-9]+)(?:\.([0-9]+))?")
_MAX_DECIMAL_LENGTH = 40  # far beyond any real amount; stops pathological inputs early


class CurrencyMismatch(ValueError):
    """Arithmetic or comparison across two currencies: there is no implicit FX."""


def exponent(currency: str) -> int:
    """Number of minor-unit digits of an ISO 4217 currency (JPY 0, EUR 2, KWD 3, CLF 4)."""
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        raise ValueError(f"{currency!r} is not an active ISO 4217 currency code") from None


def _validate_currency(value: str) -> str:
    if not (len(value) == 3 and value.isascii() and value.isalpha() and value.isupper()):
        raise PydanticCustomError(
            "currency_format", "Currency must be three upper-case letters (ISO 4217), e.g. EUR"
        )
    if value not in CURRENCY_EXPONENTS:
        raise PydanticCustomError(
            "currency_unknown", "{currency} is not an active ISO 4217 currency code", {"currency": value}
        )
    return value


CurrencyCode = Annotated[
    str,
    Strict(),
    AfterValidator(_validate_currency),
    WithJsonSchema({"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217 currency code, e.g. EUR"}),
]

AmountMinor = Annotated[
    int,
    Strict(),  # refuses 12.0, "12" and True: an amount is never guessed at
    Field(gt=0, le=MAX_AMOUNT_MINOR),
    WithJsonSchema({
        "type": "integer", "exclusiveMinimum": 0, "maximum": MAX_AMOUNT_MINOR,
        "description": "Amount in minor units of the currency (cents for EUR, yen for JPY)",
    }),
]

_MoneyAmount = Annotated[int, Strict(), Field(ge=-MAX_MONEY_MINOR, le=MAX_MONEY_MINOR)]


@dataclass(frozen=True)
class Money:
    """An amount (signed: balances and totals may be zero or negative) in one currency.
    Requests take positive amounts as `AmountMinor` + `CurrencyCode` fields instead."""

    amount: _MoneyAmount
    currency: CurrencyCode

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(0, currency)

    def _same_currency(self, other: Any) -> Money:
        if not isinstance(other, Money):
            raise TypeError(f"cannot combine Money with {type(other).__name__}")
        if other.currency != self.currency:
            raise CurrencyMismatch(f"cannot combine {self.currency} with {other.currency}")
        return other

    def __add__(self, other: Money) -> Money:
        return Money(self.amount + self._same_currency(other).amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        return Money(self.amount - self._same_currency(other).amount, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def __lt__(self, other: Money) -> bool:
        return self.amount < self._same_currency(other).amount

    def __le__(self, other: Money) -> bool:
        return self.amount <= self._same_currency(other).amount

    def __gt__(self, other: Money) -> bool:
        return self.amount > self._same_currency(other).amount

    def __ge__(self, other: Money) -> bool:
        return self.amount >= self._same_currency(other).amount

    def __str__(self) -> str:
        return f"{format_minor(self.amount, self.currency)} {self.currency}"


def to_minor(decimal: str | Decimal, currency: str) -> int:
    """"12.34" EUR -> 1234; "1000" JPY -> 1000; "1.5" JPY and "0.001" EUR are refused.
    Trailing zeros beyond the currency's precision are fine ("12.340" EUR -> 1234)."""
    digits = exponent(currency)
    text = _decimal_text(decimal)
    match = _DECIMAL.fullmatch(text) if len(text) <= _MAX_DECIMAL_LENGTH else None
    if not match:
        raise ValueError(f"{text[:_MAX_DECIMAL_LENGTH]!r} is not a plain decimal number like 12.34")
    sign, whole, fraction = match.group(1), match.group(2), match.group(3) or ""
    if fraction[digits:].strip("0"):
        raise ValueError(f"{text} has more than {digits} decimal places, the precision of {currency}")
    minor = int(whole + fraction[:digits].ljust(digits, "0"))
    return -minor if sign == "-" else minor


def _decimal_text(decimal: str | Decimal) -> str:
    if isinstance(decimal, Decimal):
        if not decimal.is_finite():
            raise ValueError(f"{decimal} is not a finite amount")
        return format(decimal, "f")  # never scientific notation
    if isinstance(decimal, str):
        return decimal
    raise TypeError(f"amounts are converted from str or Decimal, not {type(decimal).__name__}")


def format_minor(amount: int, currency: str) -> str:
    """1234 EUR -> "12.34"; -5 EUR -> "-0.05"; 1000 JPY -> "1000". No grouping, no symbol:
    this is the machine form statements and processors use."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"minor units are an int, not {type(amount).__name__}")
    digits = exponent(currency)
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), 10**digits)
    return f"{sign}{whole}.{fraction:0{digits}d}" if digits else f"{sign}{whole}"
