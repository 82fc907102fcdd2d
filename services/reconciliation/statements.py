"""Bank and processor statements in, statement lines out: the sandbox processor's CSV (and
the CSV exports banks make), ISO 20022 camt.053 (.001.02 to .001.12) and SWIFT MT940.

Every parser reads a binary stream incrementally and yields lines in batches, so memory
stays flat whatever the file's size; none of them does I/O beyond reading that stream.

    liberal where banks vary   CSV header names, case and order, delimiter, BOM, CRLF,
                               quoted fields, unambiguous thousand separators, decimal
                               commas; camt.053 namespaces and the v2/v8 shapes of the
                               same element; MT940 optional sub-fields, multi-line :86:
                               narratives, ?20-style subfields, SWIFT block wrappers
    strict where money is      an unknown currency, more decimals than the currency has,
                               an ambiguous amount ("1,250"), a missing amount or date,
                               balances that do not add up: the whole file is refused
                               with a `StatementRejected` naming the line or element

An amount is converted by `shared.money.to_minor` and nowhere else. A parser must never
round, guess a currency, or keep free-text narratives (they carry counterparty names):
only the reference found in them is kept. XML documents with a DTD or entity
declarations are refused before any entity could be expanded.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from typing import BinaryIO, NamedTuple
from xml.parsers import expat

from shared.money import CURRENCY_EXPONENTS, MAX_AMOUNT_MINOR, to_minor

BATCH_LINES = 5_000
READ_CHUNK = 256 * 1024
MAX_REFERENCE = 140
MAX_FIELD = 4_096  # longest text of any element or field we read; far beyond real files
MAX_XML_DEPTH = 64

FORMATS = ("csv", "camt053", "mt940")


class StatementLine(NamedTuple):
    line_no: int
    entry_no: int
    source_line: int | None
    value_date: date
    booking_date: date | None
    direction: str  # DBIT | CRDT
    amount: int | None  # minor units; None only for a camt.053 TxDtls without an amount
    entry_amount: int
    currency: str
    reference: str | None
    ref_uuid: str | None  # the reference as a canonical UUID, when it is one
    bank_ref: str | None


class StatementRejected(Exception):
    """The file cannot be taken as it is. `code` is stable; `line` (1-based, in the file)
    and/or `element` (an XPath-like path) and `column` say where."""

    def __init__(self, code: str, detail: str, *, line: int | None = None, element: str | None = None,
                 column: str | None = None) -> None:
        super().__init__(detail)
        self.code, self.detail, self.line, self.element, self.column = code, detail, line, element, column

    def where(self) -> dict[str, object]:
        return {k: v for k, v in (("line", self.line), ("element", self.element), ("column", self.column))
                if v is not None}


@dataclass
class StatementSummary:
    """What the parser learned about the whole file, complete once the lines are exhausted."""

    format: str
    lines: int = 0
    skipped: int = 0  # entries that are not booked (camt.053 PDNG/INFO)
    account: str | None = None
    currencies: set[str] = field(default_factory=set)
    # The period a statement declares (camt.053 FrToDt) wins over its lines' dates: an
    # entry booked on the last day with tomorrow's value date must not pull tomorrow's
    # payments into this statement's run.
    declared_start: date | None = None
    declared_end: date | None = None
    lines_start: date | None = None
    lines_end: date | None = None

    def cover(self, day: date) -> None:
        if self.lines_start is None or day < self.lines_start:
            self.lines_start = day
        if self.lines_end is None or day > self.lines_end:
            self.lines_end = day

    def declare(self, *, start: date | None = None, end: date | None = None) -> None:
        if start is not None and (self.declared_start is None or start < self.declared_start):
            self.declared_start = start
        if end is not None and (self.declared_end is None or end > self.declared_end):
            self.declared_end = end

    @property
    def period_start(self) -> date | None:
        return self.declared_start or self.lines_start

    @property
    def period_end(self) -> date | None:
        return self.declared_end or self.lines_end


def format_for(content_type: str | None) -> str | None:
    """The statement format a Content-Type names (contract: text/csv, application/xml for
    camt.053, text/plain for MT940), or None."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return {"text/csv": "csv", "application/csv": "csv", "application/xml": "camt053", "text/xml": "camt053",
            "text/plain": "mt940", "application/x-mt940": "mt940"}.get(media)


def parse(fmt: str, stream: BinaryIO, summary: StatementSummary) -> Iterator[list[StatementLine]]:
    """Batches of lines of a `fmt` statement read from `stream`; `summary` is filled as
    they go and complete at the end. Raises StatementRejected for anything malformed."""
    parsers = {"csv": _parse_csv, "camt053": _parse_camt053, "mt940": _parse_mt940}
    if fmt not in parsers:
        raise StatementRejected("unsupported_format", f"{fmt!r} is not a statement format; one of {FORMATS}.")
    if fmt == "csv":
        yield from _parse_csv(stream, summary)  # batches already: the hot path of large files
    else:
        batch: list[StatementLine] = []
        for line in parsers[fmt](stream, summary):
            batch.append(line)
            if len(batch) >= BATCH_LINES:
                yield batch
                batch = []
        if batch:
            yield batch
    if summary.period_start is None or summary.period_end is None:
        raise StatementRejected("empty_statement", "The statement has no booked lines and no period.")
    if summary.period_end < summary.period_start:
        raise StatementRejected("invalid_period", "The statement's period ends before it starts.")


# ── values: amounts, dates, references ────────────────────────────────────────────

# The common machine form ("1250.00"), taken straight to to_minor. Three decimals are left
# to the careful path: "1.250" may be 1.25 or, in a German export, 1250.
_PLAIN_AMOUNT = re.compile(r"[0-9]{1,16}(?:\.(?:[0-9]{1,2}|[0-9]{4,8}))?")
_GROUPING = frozenset(" \u00a0\u202f'")
_NO_GROUPING = str.maketrans("", "", " \u00a0\u202f'")
_AMOUNT_BODY = re.compile(r"[0-9.,]+")
_UUID_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_ANYWHERE = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_NO_REFERENCE = frozenset({"", "NOTPROVIDED", "NONREF", "NONE", "N/A"})
_TOKEN = re.compile(r"[!-~]{1,140}")  # printable ASCII without spaces: clean as it is


class ValueProblem(ValueError):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def check_currency(text: str) -> str:
    currency = text.strip().upper()
    if currency not in CURRENCY_EXPONENTS:
        raise ValueProblem("unknown_currency", f"{text.strip()[:12]!r} is not an active ISO 4217 currency code.")
    return currency


def minor_units(text: str, currency: str) -> int:
    """A positive amount in major units ("1250.00", "1.250,00", "1 250,5") as minor units of
    `currency`. Refuses ambiguity ("1,250"), excess precision, zero and signs."""
    if _PLAIN_AMOUNT.fullmatch(text):
        canonical = text
    else:
        canonical = _canonical_decimal(text, currency)
    try:
        minor = to_minor(canonical, currency)
    except ValueError:
        raise ValueProblem("too_many_decimals",
                           f"{text[:40]!r} has more decimals than {currency} allows "
                           f"({CURRENCY_EXPONENTS[currency]}).") from None
    if minor <= 0:
        raise ValueProblem("zero_amount", f"{text[:40]!r} is not a positive amount.")
    if minor > MAX_AMOUNT_MINOR:
        raise ValueProblem("amount_out_of_range", f"{text[:40]!r} exceeds the largest amount accepted.")
    return minor


_XML_DECIMAL = re.compile(r"[0-9]{1,18}(?:\.[0-9]{1,18})?")


def decimal_minor_units(text: str, currency: str) -> int:
    """An ISO 20022 amount (xs:decimal, always a dot, never grouped) as minor units."""
    if not _XML_DECIMAL.fullmatch(text):
        raise ValueProblem("invalid_amount", f"{text[:40]!r} is not a decimal amount like 1250.00.")
    try:
        minor = to_minor(text, currency)
    except ValueError:
        raise ValueProblem("too_many_decimals", f"{text[:40]!r} has more decimals than {currency} allows "
                                                f"({CURRENCY_EXPONENTS[currency]}).") from None
    if minor <= 0:
        raise ValueProblem("zero_amount", f"{text[:40]!r} is not a positive amount.")
    if minor > MAX_AMOUNT_MINOR:
        raise ValueProblem("amount_out_of_range", f"{text[:40]!r} exceeds the largest amount accepted.")
    return minor


def split_sign(text: str) -> tuple[bool, str]:
    """(negative, unsigned text) for "-12.00", "12.00-", "(12.00)", "+12.00"."""
    body = text.strip()
    if body.startswith("(") and body.endswith(")"):
        return True, body[1:-1].strip()
    if body[:1] in "+-":
        return body[0] == "-", body[1:].strip()
    if body[-1:] in "+-":
        return body[-1] == "-", body[:-1].strip()
    return False, body


def _canonical_decimal(text: str, currency: str) -> str:
    body = text.strip()
    if not body:
        raise ValueProblem("missing_amount", "The amount is empty.")
    used = {char for char in body if char in _GROUPING}
    if used:
        # A space or apostrophe only ever groups thousands ("1 250,00", "1'250.00").
        match = re.fullmatch(r"([0-9]{1,3}(?:%s[0-9]{3})+)(?:[.,]([0-9]+))?" % re.escape(used.pop()), body)
        if used or not match:
            raise ValueProblem("invalid_amount", f"{text[:40]!r} has misplaced thousand separators.")
        return match.group(1).translate(_NO_GROUPING) + ("." + match.group(2) if match.group(2) else "")
    if not _AMOUNT_BODY.fullmatch(body) or not body[0].isdigit() or not body[-1].isdigit():
        raise ValueProblem("invalid_amount", f"{text[:40]!r} is not an amount.")
    dots, commas = body.count("."), body.count(",")
    if dots and commas:
        decimal_sep = "." if body.rfind(".") > body.rfind(",") else ","
        group_sep = "," if decimal_sep == "." else "."
        whole, _, fraction = body.rpartition(decimal_sep)
        if decimal_sep in whole:
            raise ValueProblem("invalid_amount", f"{text[:40]!r} has two decimal separators.")
        return _ungroup(whole, group_sep, text) + "." + fraction
    if not dots and not commas:
        return body
    sep = "." if dots else ","
    if dots + commas > 1:  # "1.250.000": grouping only
        return _ungroup(body, sep, text)
    whole, _, fraction = body.partition(sep)
    # One separator before exactly three digits reads as thousands in half the world and
    # as decimals in the other, unless three decimals are the currency's own (KWD, BHD).
    if len(fraction) == 3 and whole != "0" and len(whole) <= 3 and CURRENCY_EXPONENTS[currency] != 3:
        raise ValueProblem("ambiguous_amount",
                           f"{text[:40]!r} is ambiguous: '{sep}' may separate thousands or decimals.")
    return whole + "." + fraction


def _ungroup(whole: str, sep: str, original: str) -> str:
    groups = whole.split(sep)
    if not (1 <= len(groups[0]) <= 3) or any(len(g) != 3 for g in groups[1:]):
        raise ValueProblem("invalid_amount", f"{original[:40]!r} has misplaced thousand separators.")
    return "".join(groups)


_DATE_CACHE: dict[str, date] = {}


def parse_date(text: str) -> date:
    """ISO (2026-03-01, or the date part of a date-time), YYYYMMDD, or DD.MM.YYYY."""
    found = _DATE_CACHE.get(text)
    if found is not None:
        return found
    body = text.strip()
    try:
        if len(body) >= 10 and body[4] == "-" and body[7] == "-":
            found = date.fromisoformat(body[:10])
            if len(body) > 10 and body[10] not in "T ":
                raise ValueError
        elif len(body) == 8 and body.isdigit():
            found = date(int(body[:4]), int(body[4:6]), int(body[6:]))
        elif len(body) == 10 and body[2] == "." and body[5] == ".":
            found = date(int(body[6:]), int(body[3:5]), int(body[:2]))
        else:
            raise ValueError
    except ValueError:
        raise ValueProblem("invalid_date",
                           f"{body[:40]!r} is not a date (YYYY-MM-DD, YYYYMMDD or DD.MM.YYYY).") from None
    if len(_DATE_CACHE) < 10_000:
        _DATE_CACHE[text] = found
    return found


def reference_uuid(reference: str | None) -> str | None:
    """The reference as a canonical UUID string when it is one: any case, with or without
    hyphens, braces or a urn:uuid: prefix."""
    if not reference:
        return None
    if _UUID_CANONICAL.fullmatch(reference):
        return reference
    body = reference.strip().lower()
    if body.startswith("urn:uuid:"):
        body = body[9:]
    body = body.strip("{}").replace("-", "")
    if _HEX32.fullmatch(body):
        return str(uuid.UUID(hex=body))
    return None


def uuid_in(text: str) -> str | None:
    """The first UUID written anywhere in a narrative (hyphens optional)."""
    match = _UUID_ANYWHERE.search(text)
    return reference_uuid(match.group(0)) if match else None


def clean_reference(text: str | None) -> str | None:
    if text is None:
        return None
    body = text.strip()
    if body.upper() in _NO_REFERENCE:
        return None
    if len(body) > MAX_REFERENCE:
        raise ValueProblem("reference_too_long", f"A reference is at most {MAX_REFERENCE} characters.")
    if not body.isprintable():
        raise ValueProblem("invalid_reference", "A reference may not contain control characters.")
    return body


def _latin1_fallback(error: UnicodeDecodeError) -> tuple[str, int]:
    return error.object[error.start:error.end].decode("latin-1"), error.end


_LATIN1_FALLBACK = "reconciliation-latin1-fallback"
codecs.register_error(_LATIN1_FALLBACK, _latin1_fallback)


def _decoded_lines(stream: BinaryIO) -> Iterator[str]:
    """Text lines of a byte stream, BOM removed. UTF-8, falling back to Latin-1 per line:
    exports from older banking software are often ISO 8859-1, and every field we read
    from them (dates, amounts, codes, references) is ASCII either way."""
    first = True
    for raw in stream:
        if first:
            first = False
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            yield raw.decode("latin-1")


# ── CSV ─────────────────────────────────────────────────────────────────────────────

_HEADER_SYNONYMS: dict[str, tuple[str, ...]] = {
    "value_date": ("valuedate", "valdt", "valuta", "valutadatum", "wertstellung", "settlementdate"),
    "booking_date": ("bookingdate", "bookgdt", "buchungstag", "postingdate", "entrydate", "transactiondate"),
    "date": ("date", "datum"),
    "direction": ("creditdebit", "cdtdbtind", "creditdebitindicator", "dc", "drcr", "debitcredit", "direction",
                  "sollhaben"),
    "amount": ("amount", "amt", "transactionamount", "betrag", "montant"),
    "debit": ("debit", "debitamount", "withdrawal", "soll"),
    "credit": ("credit", "creditamount", "deposit", "haben"),
    "currency": ("currency", "ccy", "cur", "currencycode", "waehrung", "wahrung"),
    "reference": ("reference", "endtoendid", "endtoendreference", "e2eid", "e2ereference", "eref", "paymentid",
                  "paymentreference", "clientreference", "ref", "referenz", "kundenreferenz",
                  "endtoendreferenz", "mandatereference"),
    "bank_ref": ("processorreference", "bankreference", "acctsvcrref", "transactionid", "entryreference",
                 "ntryref", "id"),
}
_HEADER_LOOKUP = {name: role for role, names in _HEADER_SYNONYMS.items() for name in names}
_DIRECTIONS = {"DBIT": "DBIT", "DEBIT": "DBIT", "D": "DBIT", "DR": "DBIT", "DB": "DBIT", "S": "DBIT", "SOLL": "DBIT",
               "CRDT": "CRDT", "CREDIT": "CRDT", "C": "CRDT", "CR": "CRDT", "H": "CRDT", "HABEN": "CRDT"}
_DELIMITERS = (",", ";", "\t", "|")


_TRANSLITERATE = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss", "é": "e", "è": "e", "à": "a"})


def _header_key(name: str) -> str:
    return "".join(ch for ch in name.lower().translate(_TRANSLITERATE) if ch.isascii() and ch.isalnum())


def _columns(header: list[str], line: int) -> dict[str, int]:
    columns: dict[str, int] = {}
    for index, name in enumerate(header):
        role = _HEADER_LOOKUP.get(_header_key(name))
        if role is None:
            continue  # columns we do not use (type, description, balance ...) are fine
        if role in columns:
            raise StatementRejected("ambiguous_header", f"Two columns mean {role}: "
                                    f"{header[columns[role]]!r} and {name!r}.", line=line, column=name[:60])
        columns[role] = index
    if "value_date" not in columns:
        for fallback in ("booking_date", "date"):
            if fallback in columns:
                columns["value_date"] = columns[fallback]
                break
    missing = [role for role in ("value_date", "currency") if role not in columns]
    if "amount" not in columns and not ("debit" in columns and "credit" in columns):
        missing.append("amount")
    if missing:
        raise StatementRejected("unrecognised_header",
                                f"The header names no column for {', '.join(missing)}; "
                                "expected e.g. value_date, amount, currency, credit_debit, reference.", line=line)
    return columns


def _parse_csv(stream: BinaryIO, summary: StatementSummary) -> Iterator[list[StatementLine]]:
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors=_LATIN1_FALLBACK, newline="")
    physical = 0
    header_text = ""
    for header_text in text:
        physical += 1
        if header_text.strip():
            break
    else:
        raise StatementRejected("empty_statement", "The file is empty.")
    delimiter = max(_DELIMITERS, key=header_text.count)
    try:
        header = next(csv.reader([header_text], delimiter=delimiter, strict=True))
    except csv.Error as exc:
        raise StatementRejected("malformed_csv", f"The header is not valid CSV: {exc}.", line=physical) from None
    columns = _columns(header, physical)
    width = len(header)
    get = columns.get
    i_value, i_booking, i_direction = get("value_date"), get("booking_date"), get("direction")
    i_amount, i_debit, i_credit, i_currency = get("amount"), get("debit"), get("credit"), get("currency")
    i_reference, i_bank_ref = get("reference"), get("bank_ref")
    if i_booking == i_value:
        i_booking = None
    # The hot loop: one row in, one line out. Common shapes (a plain amount, a known
    # upper-case currency, an ISO date, a canonical UUID reference) take the fast path;
    # anything else goes through the general, stricter functions.
    plain_amount, canonical_uuid, plain_token = _PLAIN_AMOUNT.fullmatch, _UUID_CANONICAL.fullmatch, _TOKEN.fullmatch
    known_currency, directions, dates = CURRENCY_EXPONENTS, _DIRECTIONS, _DATE_CACHE
    new_line = tuple.__new__
    line_no = 0
    row_line = physical
    batch: list[StatementLine] = []
    append = batch.append
    try:
        for row, row_line in _csv_rows(text, delimiter, physical):
            if len(row) != width:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                raise StatementRejected("malformed_csv", f"The row has {len(row)} fields; the header has {width}.",
                                        line=row_line)
            line_no += 1
            column = "currency"
            try:
                currency = row[i_currency]
                if currency not in known_currency:
                    currency = check_currency(currency)
                column = "value_date"
                value_date = dates.get(row[i_value]) or parse_date(row[i_value])
                booking_date = None
                if i_booking is not None and row[i_booking]:
                    column = "booking_date"
                    booking_date = dates.get(row[i_booking]) or parse_date(row[i_booking])
                column = "amount"
                amount_text = row[i_amount] if i_amount is not None else None
                if amount_text is not None and i_direction is not None and plain_amount(amount_text):
                    direction = directions.get(row[i_direction]) or _direction_of(row[i_direction])
                    amount = to_minor(amount_text, currency)
                    if amount <= 0 or amount > MAX_AMOUNT_MINOR:
                        amount = minor_units(amount_text, currency)  # raises the precise problem
                else:
                    direction, amount = _csv_amount(row, i_amount, i_debit, i_credit, i_direction, currency)
                column = "reference"
                reference = row[i_reference] if i_reference is not None else None
                if reference is not None and canonical_uuid(reference):
                    ref_uuid = reference
                else:
                    reference = clean_reference(reference)
                    ref_uuid = reference_uuid(reference)
                column = "bank_ref"
                bank_ref = row[i_bank_ref] if i_bank_ref is not None else None
                if bank_ref is not None and not (plain_token(bank_ref) and bank_ref.upper() not in _NO_REFERENCE):
                    bank_ref = clean_reference(bank_ref)
            except ValueProblem as problem:
                if problem.code == "invalid_direction":
                    column = "direction"
                raise StatementRejected(problem.code, str(problem), line=row_line,
                                        column=_column_name(header, columns, column)) from None
            except ValueError:
                # to_minor's refusal on the fast path: more decimals than the currency has.
                raise StatementRejected("too_many_decimals",
                                        f"The amount has more decimals than {currency} allows "
                                        f"({CURRENCY_EXPONENTS[currency]}).", line=row_line,
                                        column=_column_name(header, columns, column)) from None
            summary.lines = line_no
            if value_date != summary.lines_end or value_date != summary.lines_start:
                summary.cover(value_date)
            summary.currencies.add(currency)
            append(new_line(StatementLine, (line_no, line_no, row_line, value_date, booking_date, direction, amount,
                                            amount, currency, reference, ref_uuid, bank_ref)))
            if line_no % BATCH_LINES == 0:
                yield batch
                batch = []
                append = batch.append
        if batch:
            yield batch
    except _CsvError as exc:
        raise StatementRejected("malformed_csv", f"The row is not valid CSV: {exc.reason}.", line=exc.line) from None
    except UnicodeDecodeError:  # unreachable with the Latin-1 fallback; kept so it can never be a 500
        raise StatementRejected("invalid_encoding", "The file is neither UTF-8 nor Latin-1.",
                                line=row_line) from None


class _CsvError(Exception):
    def __init__(self, reason: str, line: int) -> None:
        super().__init__(reason)
        self.reason, self.line = reason, line


def _csv_rows(lines: Iterator[str], delimiter: str, physical: int) -> Iterator[tuple[list[str], int]]:
    """(fields, number of the row's last line). A line without a quote is split as it is
    (most of every export, three times faster); a quoted one goes through the csv module,
    which reads on as far as its quotes need (a field may hold a newline)."""
    for line in lines:
        physical += 1
        if '"' not in line:
            yield line.rstrip("\r\n").split(delimiter), physical
            continue
        reader = csv.reader(itertools.chain([line], lines), delimiter=delimiter, strict=True)
        try:
            row = next(reader)
        except (csv.Error, StopIteration) as exc:
            raise _CsvError(str(exc) or "unterminated quoted field", physical) from None
        physical += reader.line_num - 1
        yield row, physical


def _direction_of(indicator: str) -> str:
    direction = _DIRECTIONS.get(indicator.strip().upper())
    if direction is None:
        raise ValueProblem("invalid_direction", f"{indicator.strip()[:12]!r} is not a credit/debit indicator "
                                                "(DBIT/CRDT, D/C, DR/CR, DEBIT/CREDIT).")
    return direction


def _column_name(header: list[str], columns: dict[str, int], role: str) -> str:
    if role in columns:
        return header[columns[role]][:60]
    if role == "amount":
        return f"{header[columns['debit']][:28]}/{header[columns['credit']][:28]}"
    return role


def _csv_amount(row: list[str], i_amount: int | None, i_debit: int | None, i_credit: int | None,
                i_direction: int | None, currency: str) -> tuple[str, int]:
    if i_amount is not None:
        text = row[i_amount]
        if _PLAIN_AMOUNT.fullmatch(text):
            negative, unsigned = False, text
        else:
            if not text.strip():
                raise ValueProblem("missing_amount", "The amount is empty.")
            negative, unsigned = split_sign(text)
        amount = minor_units(unsigned, currency)
        if i_direction is None:
            return ("DBIT" if negative else "CRDT"), amount
        direction = _direction_of(row[i_direction])
        if negative and direction == "CRDT":
            raise ValueProblem("conflicting_sign", "A negative amount is marked as a credit.")
        return direction, amount
    debit, credit = row[i_debit].strip(), row[i_credit].strip()
    if bool(debit) == bool(credit):
        raise ValueProblem("missing_amount" if not debit else "ambiguous_amount",
                           "Exactly one of the debit and credit columns must hold the amount.")
    negative, unsigned = split_sign(debit or credit)
    if negative:
        raise ValueProblem("conflicting_sign", "Debit and credit columns hold unsigned amounts.")
    return ("DBIT" if debit else "CRDT"), minor_units(unsigned, currency)


# ── camt.053 ─────────────────────────────────────────────────────────────────────────

CAMT053_NAMESPACE = re.compile(r"urn:iso:std:iso:20022:tech:xsd:camt\.053\.001\.(\d{2})")
CAMT053_VERSIONS = range(2, 13)
_OPENING_CODES = ("OPBD", "PRCD")
_CLOSING_CODES = ("CLBD",)
# Elements whose text we keep, by path relative to the element being collected. Anything
# else (narratives, addresses, names) is never accumulated.
_NTRY_FIELDS = {"Amt", "CdtDbtInd", "Sts", "Sts/Cd", "BookgDt/Dt", "BookgDt/DtTm", "ValDt/Dt", "ValDt/DtTm",
                "NtryRef", "AcctSvcrRef", "RvslInd"}
_TX_FIELDS = {"Refs/EndToEndId", "Refs/AcctSvcrRef", "Refs/TxId", "Amt", "AmtDtls/TxAmt/Amt",
              "AmtDtls/InstdAmt/Amt", "CdtDbtInd", "RmtInf/Ustrd", "RmtInf/Strd/CdtrRefInf/Ref"}
_BAL_FIELDS = {"Tp/CdOrPrtry/Cd", "Amt", "CdtDbtInd", "Dt/Dt", "Dt/DtTm"}
_STMT_FIELDS = {"FrToDt/FrDtTm", "FrToDt/ToDtTm", "Acct/Id/IBAN", "Acct/Id/Othr/Id", "Acct/Ccy"}


@dataclass
class _Collected:
    """Text (and Ccy attributes) of the wanted descendants of one element."""

    path: str  # for error messages
    fields: dict[str, str] = field(default_factory=dict)
    currencies: dict[str, str] = field(default_factory=dict)
    source_line: int = 0


class _Camt053:
    def __init__(self, summary: StatementSummary) -> None:
        self.summary = summary
        self.stack: list[str] = []  # local names from the root
        self.counters: list[dict[str, int]] = [{}]
        self.paths: list[str] = []  # indexed path for messages
        self.text: list[str] | None = None
        self.root_seen = False
        self.namespace = ""
        self.statement_index = 0
        self.entry_no = 0
        self.line_no = 0
        self.stmt: _Collected | None = None
        self.balances: list[_Collected] = []
        self.balance: _Collected | None = None
        self.entry: _Collected | None = None
        self.transactions: list[_Collected] = []
        self.transaction: _Collected | None = None
        self.statement_net: dict[str, int] = {}
        self.out: list[StatementLine] = []
        self.parser = expat.ParserCreate(namespace_separator=" ")
        self.parser.buffer_text = True
        self.parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        self.parser.StartElementHandler = self.start
        self.parser.EndElementHandler = self.end
        self.parser.CharacterDataHandler = self.characters
        self.parser.StartDoctypeDeclHandler = self.forbidden_dtd
        self.parser.EntityDeclHandler = self.forbidden_entity
        self.parser.UnparsedEntityDeclHandler = self.forbidden_entity
        self.parser.ExternalEntityRefHandler = self.forbidden_entity

    # ── security ──
    def forbidden_dtd(self, *args) -> None:
        raise self.reject("dtd_forbidden", "A document type declaration (DTD) is not accepted in a statement.")

    def forbidden_entity(self, *args) -> None:
        raise self.reject("entity_forbidden", "Entity declarations and external entities are not accepted.")

    def reject(self, code: str, detail: str, element: str | None = None) -> StatementRejected:
        return StatementRejected(code, detail, line=self.parser.CurrentLineNumber,
                                 element=element or ("/".join(self.paths) or None))

    # ── structure ──
    def start(self, name: str, attrs: dict[str, str]) -> None:
        namespace, _, local = name.rpartition(" ")
        if not self.root_seen:
            self.root_seen = True
            match = CAMT053_NAMESPACE.fullmatch(namespace)
            if local != "Document" or not match:
                raise self.reject("unsupported_format", "This is not an ISO 20022 camt.053 document "
                                  "(root Document in urn:iso:std:iso:20022:tech:xsd:camt.053.001.NN).",
                                  element=local)
            if int(match.group(1)) not in CAMT053_VERSIONS:
                raise self.reject("unsupported_camt_version",
                                  f"camt.053.001.{match.group(1)} is not supported (versions 02 to 12 are).",
                                  element=local)
            self.namespace = namespace
        elif namespace != self.namespace:
            return self._push_foreign(local)
        if len(self.stack) >= MAX_XML_DEPTH:
            raise self.reject("malformed_xml", "The document nests too deeply.")
        counts = self.counters[-1]
        counts[local] = counts.get(local, 0) + 1
        self.stack.append(local)
        self.counters.append({})
        self.paths.append(f"{local}[{counts[local]}]" if local in ("Stmt", "Ntry", "TxDtls", "Bal") else local)
        depth = len(self.stack)
        parent = self.stack[-2] if depth >= 2 else ""
        here = self._path()
        if local == "Stmt" and parent == "BkToCstmrStmt":
            self.statement_index += 1
            self.stmt = _Collected(here)
            self.balances = []
            self.statement_net = {}
        elif local == "Bal" and parent == "Stmt":
            self.balance = _Collected(here)
        elif local == "Ntry" and parent == "Stmt":
            self.entry = _Collected(here, source_line=self.parser.CurrentLineNumber)
            self.transactions = []
        elif local == "TxDtls" and self.entry is not None and parent == "NtryDtls":
            self.transaction = _Collected(here)
        owner, relative = self._owner()
        if owner is not None:
            self.text = [] if relative in self._wanted(owner) else None
            if self.text is not None and "Ccy" in attrs:
                owner.currencies[relative] = attrs["Ccy"]
        else:
            self.text = None

    def _push_foreign(self, local: str) -> None:
        # Supplementary data in another namespace: keep the structure, read nothing.
        self.stack.append(local)
        self.counters.append({})
        self.paths.append(local)
        self.text = None

    def _path(self) -> str:
        return "/".join(self.paths)

    def _owner(self) -> tuple[_Collected | None, str]:
        """The element collecting the current one, and the current one's relative path."""
        stack = self.stack
        for target, anchor in ((self.transaction, "TxDtls"), (self.entry, "Ntry"), (self.balance, "Bal"),
                               (self.stmt, "Stmt")):
            if target is None:
                continue
            try:
                index = len(stack) - 1 - stack[::-1].index(anchor)
            except ValueError:
                continue
            return target, "/".join(stack[index + 1:])
        return None, ""

    def _wanted(self, owner: _Collected) -> set[str]:
        if owner is self.transaction:
            return _TX_FIELDS
        if owner is self.entry:
            return _NTRY_FIELDS
        if owner is self.balance:
            return _BAL_FIELDS
        return _STMT_FIELDS

    def characters(self, data: str) -> None:
        if self.text is not None:
            self.text.append(data)
            if sum(len(part) for part in self.text) > MAX_FIELD:
                raise self.reject("malformed_xml", f"An element's text is longer than {MAX_FIELD} characters.")

    def end(self, name: str) -> None:
        local = name.rpartition(" ")[2]
        if self.text is not None:
            owner, relative = self._owner()
            if owner is not None:
                owner.fields[relative] = "".join(self.text).strip()
            self.text = None
        here = self._path()
        if local == "TxDtls" and self.transaction is not None and self.stack[-2:-1] == ["NtryDtls"]:
            self.transactions.append(self.transaction)
            self.transaction = None
        elif local == "Ntry" and self.entry is not None and self.stack[-2:-1] == ["Stmt"]:
            self._entry_done(self.entry, self.transactions)
            self.entry = None
        elif local == "Bal" and self.balance is not None and self.stack[-2:-1] == ["Stmt"]:
            self.balances.append(self.balance)
            self.balance = None
        elif local == "Stmt" and self.stmt is not None and self.stack[-2:-1] == ["BkToCstmrStmt"]:
            self._statement_done(self.stmt, here)
            self.stmt = None
        self.stack.pop()
        self.counters.pop()
        self.paths.pop()

    # ── meaning ──
    def _amount(self, owner: _Collected, key: str, *, required: bool = True) -> tuple[int, str] | None:
        text = owner.fields.get(key)
        element = f"{owner.path}/{key}"
        if text is None:
            if required:
                raise StatementRejected("missing_amount", "The amount is missing.", element=element,
                                        line=owner.source_line or None)
            return None
        currency_text = owner.currencies.get(key)
        if not currency_text:
            raise StatementRejected("missing_currency", "The amount has no Ccy attribute.", element=element)
        try:
            currency = check_currency(currency_text)
            return decimal_minor_units(text, currency), currency
        except ValueProblem as problem:
            raise StatementRejected(problem.code, str(problem), element=element,
                                    line=owner.source_line or None) from None

    def _direction(self, owner: _Collected, *, default: str | None = None) -> str:
        text = owner.fields.get("CdtDbtInd", default)
        if text not in ("DBIT", "CRDT"):
            raise StatementRejected("invalid_direction", "CdtDbtInd must be DBIT or CRDT.",
                                    element=f"{owner.path}/CdtDbtInd", line=owner.source_line or None)
        return text

    def _date(self, owner: _Collected, *keys: str, required: bool) -> date | None:
        for key in keys:
            if key in owner.fields:
                try:
                    return parse_date(owner.fields[key])
                except ValueProblem as problem:
                    raise StatementRejected(problem.code, str(problem), element=f"{owner.path}/{key}",
                                            line=owner.source_line or None) from None
        if required:
            raise StatementRejected("missing_date", "The entry has neither a value date nor a booking date.",
                                    element=f"{owner.path}/ValDt", line=owner.source_line or None)
        return None

    def _entry_done(self, entry: _Collected, transactions: list[_Collected]) -> None:
        self.entry_no += 1
        status = entry.fields.get("Sts/Cd") or entry.fields.get("Sts") or "BOOK"
        if status != "BOOK":
            # Pending or informational entries are not money that moved; counted, not kept.
            self.summary.skipped += 1
            return
        amount, currency = self._amount(entry, "Amt")
        direction = self._direction(entry)
        booking_date = self._date(entry, "BookgDt/Dt", "BookgDt/DtTm", required=False)
        value_date = self._date(entry, "ValDt/Dt", "ValDt/DtTm", required=False) or booking_date
        if value_date is None:
            self._date(entry, "ValDt/Dt", required=True)
        signed = amount if direction == "CRDT" else -amount
        self.statement_net[currency] = self.statement_net.get(currency, 0) + signed
        entry_ref = _clean(entry, "AcctSvcrRef") or _clean(entry, "NtryRef")
        self.summary.currencies.add(currency)
        self.summary.cover(value_date)
        if not transactions:
            self._emit(value_date, booking_date, direction, amount, amount, currency, None, entry_ref,
                       entry.source_line)
            return
        details = []
        for tx in transactions:
            found = (self._amount(tx, "Amt", required=False) or self._amount(tx, "AmtDtls/TxAmt/Amt", required=False)
                     or self._amount(tx, "AmtDtls/InstdAmt/Amt", required=False))
            tx_direction = self._direction(tx, default=direction)
            if found is not None and found[1] != currency:
                raise StatementRejected("currency_mismatch_in_entry",
                                        f"The transaction is in {found[1]}, its entry in {currency}.",
                                        element=f"{tx.path}/Amt", line=entry.source_line)
            reference = _clean(tx, "Refs/EndToEndId")
            ref_uuid = reference_uuid(reference)
            if ref_uuid is None:
                # No usable end-to-end id: a UUID in the remittance information still counts.
                for key in ("RmtInf/Strd/CdtrRefInf/Ref", "RmtInf/Ustrd"):
                    if tx.fields.get(key):
                        ref_uuid = uuid_in(tx.fields[key])
                        if ref_uuid:
                            reference = reference or ref_uuid
                            break
            bank_ref = _clean(tx, "Refs/AcctSvcrRef") or _clean(tx, "Refs/TxId") or entry_ref
            details.append((found[0] if found else None, tx_direction, reference, ref_uuid, bank_ref, tx))
        with_amount = [d for d in details if d[0] is not None]
        if with_amount and len(with_amount) != len(details):
            raise StatementRejected("partial_transaction_amounts",
                                    "Some transaction details of the entry have amounts and some do not.",
                                    element=entry.path, line=entry.source_line)
        if with_amount:
            total = sum(a if d == direction else -a for a, d, *_ in details)
            if total != amount:
                raise StatementRejected("entry_amount_mismatch",
                                        "The transaction details do not add up to the entry amount.",
                                        element=f"{entry.path}/Amt", line=entry.source_line)
        for tx_amount, tx_direction, reference, ref_uuid, bank_ref, _tx in details:
            self._emit(value_date, booking_date, tx_direction, tx_amount, amount, currency, reference, bank_ref,
                       entry.source_line, ref_uuid=ref_uuid)

    def _emit(self, value_date: date, booking_date: date | None, direction: str, amount: int | None,
              entry_amount: int, currency: str, reference: str | None, bank_ref: str | None, source_line: int,
              *, ref_uuid: str | None = None) -> None:
        self.line_no += 1
        self.summary.lines = self.line_no
        self.out.append(StatementLine(self.line_no, self.entry_no, source_line, value_date, booking_date, direction,
                                      amount, entry_amount, currency, reference,
                                      ref_uuid if ref_uuid is not None else reference_uuid(reference), bank_ref))

    def _statement_done(self, stmt: _Collected, path: str) -> None:
        for key, bound in (("FrToDt/FrDtTm", "start"), ("FrToDt/ToDtTm", "end")):
            if key in stmt.fields:
                try:
                    self.summary.declare(**{bound: parse_date(stmt.fields[key])})
                except ValueProblem as problem:
                    raise StatementRejected(problem.code, str(problem), element=f"{path}/{key}") from None
        account = stmt.fields.get("Acct/Id/IBAN") or stmt.fields.get("Acct/Id/Othr/Id")
        if account and self.summary.account is None:
            self.summary.account = account[:64]
        opening = closing = None
        for balance in self.balances:
            code = balance.fields.get("Tp/CdOrPrtry/Cd")
            if code in _OPENING_CODES or code in _CLOSING_CODES:
                amount_currency = self._balance_amount(balance)
                if code in _OPENING_CODES and opening is None:
                    opening = amount_currency
                elif code in _CLOSING_CODES:
                    closing = amount_currency
        if opening and closing and opening[1] == closing[1]:
            net = self.statement_net.get(opening[1], 0)
            if opening[0] + net != closing[0]:
                raise StatementRejected(
                    "balance_mismatch",
                    "The opening balance plus the booked entries does not equal the closing balance.",
                    element=path)

    def _balance_amount(self, balance: _Collected) -> tuple[int, str]:
        text = balance.fields.get("Amt")
        element = f"{balance.path}/Amt"
        if text is None:
            raise StatementRejected("missing_amount", "The balance has no amount.", element=element)
        try:
            currency = check_currency(balance.currencies.get("Amt", ""))
            negative, unsigned = split_sign(text)
            # A zero balance is a real balance; amounts of lines are never zero.
            minor = 0 if unsigned.strip("0.") == "" else decimal_minor_units(unsigned, currency)
        except ValueProblem as problem:
            raise StatementRejected(problem.code, str(problem), element=element) from None
        sign = -1 if (balance.fields.get("CdtDbtInd") == "DBIT") != negative else 1
        return sign * minor, currency

    def feed(self, chunk: bytes, final: bool = False) -> list[StatementLine]:
        try:
            self.parser.Parse(chunk, final)
        except expat.ExpatError as exc:
            raise StatementRejected("malformed_xml", f"The XML is not well-formed: {expat.ErrorString(exc.code)}.",
                                    line=exc.lineno, element=self._path() or None) from None
        out, self.out = self.out, []
        return out


def _clean(owner: _Collected, key: str) -> str | None:
    try:
        return clean_reference(owner.fields.get(key))
    except ValueProblem as problem:
        raise StatementRejected(problem.code, str(problem), element=f"{owner.path}/{key}",
                                line=owner.source_line or None) from None


def _parse_camt053(stream: BinaryIO, summary: StatementSummary) -> Iterator[StatementLine]:
    document = _Camt053(summary)
    while chunk := stream.read(READ_CHUNK):
        yield from document.feed(chunk)
    yield from document.feed(b"", final=True)
    if not document.root_seen:
        raise StatementRejected("empty_statement", "The file is empty.")


# ── MT940 ────────────────────────────────────────────────────────────────────────────

_TAG = re.compile(r":(\d{2}[A-Z]?|NS):(.*)")
_BALANCE = re.compile(r"([CD])(\d{6})([A-Z]{3})([0-9]+,?[0-9]*)")
_LINE61 = re.compile(
    r"(?P<vd>\d{6})(?P<ed>\d{4})?(?P<dc>RC|RD|EC|ED|C|D)(?P<fc>[A-Z])?(?P<amt>[0-9]+,?[0-9]*)"
    r"(?P<tt>[NFS][A-Z0-9]{3})(?P<cref>.*?)(?://(?P<bref>.*))?"
)
_MT940_DIRECTIONS = {"D": "DBIT", "RC": "DBIT", "ED": "DBIT", "C": "CRDT", "RD": "CRDT", "EC": "CRDT"}
_EREF_SLASH = re.compile(r"/EREF/([^/]+)")
_EREF_PLUS = re.compile(r"EREF\+(.+?)(?=(?:KREF|MREF|CRED|DEBT|SVWZ|ABWA|ABWE|IBAN|BIC|COAM|OAMT)\+|$)")
_SUBFIELD = re.compile(r"\?(\d{2})")


def _mt940_date(text: str) -> date:
    year = int(text[:2])
    return date(2000 + year if year < 80 else 1900 + year, int(text[2:4]), int(text[4:6]))


def _mt940_amount(text: str, currency: str) -> int:
    # SWIFT amounts always use the comma as the decimal mark and never group ("1250,00").
    return decimal_minor_units(text.replace(",", ".").rstrip("."), currency)


def _narrative_reference(narrative: str) -> str | None:
    """The end-to-end reference in an :86: narrative: SEPA `EREF+` in ?20-?29 subfields,
    SWIFT-style `/EREF/`, or else any UUID in the text."""
    flat = narrative.replace("\n", "")
    if _SUBFIELD.search(flat):
        parts = _SUBFIELD.split(flat)
        # parts = [gvc, code, text, code, text, ...]: purpose lines ?20-?29 and ?60-?63
        purpose = "".join(text for code, text in zip(parts[1::2], parts[2::2])
                          if 20 <= int(code) <= 29 or 60 <= int(code) <= 63)
        match = _EREF_PLUS.search(purpose)
        if match and match.group(1).strip().upper() not in _NO_REFERENCE:
            return match.group(1).strip()
        flat = purpose or flat
    match = _EREF_SLASH.search(flat)
    if match and match.group(1).strip().upper() not in _NO_REFERENCE:
        return match.group(1).strip()
    return uuid_in(flat)


@dataclass
class _Mt940Statement:
    currency: str | None = None
    opening: int | None = None
    net: int = 0
    line_start: int = 0


def _mt940_fields(stream: BinaryIO) -> Iterator[tuple[str, str, int]]:
    """(tag, content, line) for each field, continuation lines joined with newlines and
    SWIFT block wrappers ({1:...}{2:...}{4: ... -}) removed."""
    tag: str | None = None
    content: list[str] = []
    start = 0
    for number, raw in enumerate(_decoded_lines(stream), start=1):
        text = raw.rstrip("\r\n")
        if text.startswith("{"):
            position = text.find("{4:")
            if position < 0:
                continue  # header blocks 1-3 or trailer block 5
            text = text[position + 3:]
            if not text:
                continue
        if text.strip() in ("-}", "-", "}") or text.startswith("-}"):
            if tag is not None:
                yield tag, "\n".join(content), start
            tag, content = None, []
            continue
        match = _TAG.match(text)
        if match:
            if tag is not None:
                yield tag, "\n".join(content), start
            tag, content, start = match.group(1), [match.group(2)], number
        elif tag is not None:
            content.append(text)
        elif text.strip():
            raise StatementRejected("malformed_mt940", "Text outside any field; a field starts with :NN:.",
                                    line=number)
        if len(content) > 64 or sum(len(c) for c in content) > MAX_FIELD:
            raise StatementRejected("malformed_mt940", "A field is longer than MT940 allows.", line=start)
    if tag is not None:
        yield tag, "\n".join(content), start


def _parse_mt940(stream: BinaryIO, summary: StatementSummary) -> Iterator[StatementLine]:
    statement: _Mt940Statement | None = None
    pending: tuple[dict[str, str | None], int] | None = None
    line_no = 0
    seen_field = False

    def finish(entry: tuple[dict[str, str | None], int], narrative: str | None) -> StatementLine:
        nonlocal line_no
        fields, source_line = entry
        reference = fields["reference"]
        ref_uuid = reference_uuid(reference)
        narrative = "\n".join(part for part in (fields["supplementary"], narrative) if part)
        if ref_uuid is None and narrative:
            found = _narrative_reference(narrative)
            if found:
                try:
                    found = clean_reference(found)
                except ValueProblem:
                    found = None
                if found:
                    reference, ref_uuid = found, reference_uuid(found)
        line_no += 1
        summary.lines = line_no
        return StatementLine(line_no, line_no, source_line, fields["value_date"], fields["booking_date"],
                             fields["direction"], fields["amount"], fields["amount"], fields["currency"],
                             reference, ref_uuid, fields["bank_ref"])

    for tag, content, line in _mt940_fields(stream):
        seen_field = True
        if tag != "86" and pending is not None:
            yield finish(pending, None)
            pending = None
        if tag == "20":
            statement = _Mt940Statement(line_start=line)
        elif tag == "25":
            if summary.account is None:
                summary.account = content.strip()[:64] or None
        elif tag in ("60F", "60M"):
            statement = statement or _Mt940Statement(line_start=line)
            currency, opening, _ = _mt940_balance(content, line, tag)
            statement.currency, statement.opening, statement.net = currency, opening, 0
        elif tag == "61":
            if statement is None or statement.currency is None:
                raise StatementRejected("missing_opening_balance",
                                        "A :61: line comes before the :60F: opening balance that gives its currency.",
                                        line=line, element=":61:")
            pending = (_mt940_line(content, line, statement), line)
            signed = pending[0]["amount"] if pending[0]["direction"] == "CRDT" else -pending[0]["amount"]
            statement.net += signed
            summary.currencies.add(statement.currency)
            summary.cover(pending[0]["value_date"])
        elif tag == "86":
            if pending is not None:
                yield finish(pending, content)
                pending = None
        elif tag in ("62F", "62M"):
            if statement is None or statement.opening is None:
                raise StatementRejected("missing_opening_balance", "A closing balance without an opening balance.",
                                        line=line, element=f":{tag}:")
            currency, closing, closing_date = _mt940_balance(content, line, tag)
            if currency != statement.currency:
                raise StatementRejected("currency_mismatch", "The closing balance is in another currency than the "
                                        "opening balance.", line=line, element=f":{tag}:")
            if statement.opening + statement.net != closing:
                raise StatementRejected("balance_mismatch", "The opening balance plus the statement lines does not "
                                        "equal the closing balance.", line=line, element=f":{tag}:")
            if summary.lines_start is None:
                summary.declare(start=closing_date, end=closing_date)
            statement.opening, statement.net = closing, 0  # a :60M: page may follow
    if pending is not None:
        yield finish(pending, None)
    if not seen_field:
        raise StatementRejected("empty_statement", "The file is empty.")


def _mt940_balance(content: str, line: int, tag: str) -> tuple[str, int, date]:
    match = _BALANCE.fullmatch(content.strip())
    if not match:
        raise StatementRejected("invalid_balance", "A balance is D|C, YYMMDD, currency and amount "
                                "(e.g. C260301EUR1250,00).", line=line, element=f":{tag}:")
    mark, day, currency_text, amount_text = match.groups()
    try:
        currency = check_currency(currency_text)
        amount = 0 if amount_text.strip("0,") == "" else _mt940_amount(amount_text, currency)
        return currency, (-amount if mark == "D" else amount), _mt940_date(day)
    except ValueProblem as problem:
        raise StatementRejected(problem.code, str(problem), line=line, element=f":{tag}:") from None
    except ValueError:
        raise StatementRejected("invalid_date", "The balance date is not a date.", line=line,
                                element=f":{tag}:") from None


def _mt940_line(content: str, line: int, statement: _Mt940Statement) -> dict[str, object]:
    first, _, supplementary = content.partition("\n")
    match = _LINE61.fullmatch(first.strip())
    if not match:
        raise StatementRejected("malformed_mt940", "A :61: line is YYMMDD[MMDD], D/C/RD/RC, amount, type code "
                                "and reference (e.g. 2603010301D1250,00NTRFNONREF//B1).", line=line, element=":61:")
    try:
        value_date = _mt940_date(match["vd"])
    except ValueError:
        raise StatementRejected("invalid_date", "The value date is not a date.", line=line, element=":61:") from None
    booking_date = None
    if match["ed"]:
        month, day = int(match["ed"][:2]), int(match["ed"][2:])
        year = value_date.year
        if month == 12 and value_date.month == 1:
            year -= 1
        elif month == 1 and value_date.month == 12:
            year += 1
        try:
            booking_date = date(year, month, day)
        except ValueError:
            raise StatementRejected("invalid_date", "The entry date is not a date.", line=line,
                                    element=":61:") from None
    try:
        amount = _mt940_amount(match["amt"], statement.currency)
        reference = clean_reference(match["cref"])
        bank_ref = clean_reference((match["bref"] or "").strip() or None)
    except ValueProblem as problem:
        raise StatementRejected(problem.code, str(problem), line=line, element=":61:") from None
    return {"value_date": value_date, "booking_date": booking_date, "direction": _MT940_DIRECTIONS[match["dc"]],
            "amount": amount, "currency": statement.currency, "reference": reference, "bank_ref": bank_ref,
            "supplementary": supplementary.strip() or None}


def lines_of(fmt: str, data: bytes | Iterable[bytes]) -> tuple[list[StatementLine], StatementSummary]:
    """Every line of a small statement held in memory (tests, tools)."""
    raw = data if isinstance(data, bytes) else b"".join(data)
    summary = StatementSummary(format=fmt)
    found = [line for batch in parse(fmt, io.BytesIO(raw), summary) for line in batch]
    return found, summary
