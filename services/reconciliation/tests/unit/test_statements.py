"""The statement parsers, without I/O: what banks vary in is accepted, what money depends
on is refused with a code and a place, and no input whatsoever crashes them."""

from __future__ import annotations

import io
import uuid
from datetime import date
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from services.reconciliation.statements import (
    StatementRejected, StatementSummary, ValueProblem, format_for, lines_of, minor_units, parse, parse_date,
    reference_uuid,
)
from shared.money import CURRENCY_EXPONENTS, MAX_AMOUNT_MINOR, format_minor

SAMPLES = Path(__file__).parent.parent / "samples"
PAYMENT = "0b8f3c1e-6a52-4d8e-9a41-5c2f7e9d1a01"


def rejected(fmt: str, data: bytes) -> StatementRejected:
    with pytest.raises(StatementRejected) as caught:
        lines_of(fmt, data)
    return caught.value


# ── amounts ──────────────────────────────────────────────────────────────────────────


@given(st.integers(min_value=1, max_value=MAX_AMOUNT_MINOR), st.sampled_from(sorted(CURRENCY_EXPONENTS)))
def test_a_formatted_amount_converts_back_to_the_same_minor_units(minor, currency):
    assert minor_units(format_minor(minor, currency), currency) == minor


@given(st.integers(min_value=1000, max_value=10**12))
def test_grouped_amounts_in_both_conventions_are_the_same_money(minor):
    whole, cents = divmod(minor, 100)
    grouped = f"{whole:,}"
    assert minor_units(f"{grouped}.{cents:02d}", "EUR") == minor  # 1,250.00
    assert minor_units(f"{grouped.replace(',', '.')},{cents:02d}", "EUR") == minor  # 1.250,00
    assert minor_units(f"{grouped.replace(',', ' ')},{cents:02d}", "EUR") == minor  # 1 250,00
    assert minor_units(f"{grouped.replace(',', chr(39))}.{cents:02d}", "EUR") == minor  # 1'250.00


@pytest.mark.parametrize("text, code", [
    ("1,250", "ambiguous_amount"),  # thousands or decimals?
    ("1.250", "ambiguous_amount"),
    ("12.345", "ambiguous_amount"),  # 12.345 or 12345?
    ("12.3456", "too_many_decimals"),  # EUR has two
    ("0.001", "too_many_decimals"),
    ("0.00", "zero_amount"),
    ("1.2.3,4", "invalid_amount"),
    ("12,34.56", "invalid_amount"),
    ("1 2", "invalid_amount"),  # grouping must be in threes
    ("abc", "invalid_amount"),
    ("1e5", "invalid_amount"),
    ("NaN", "invalid_amount"),
    ("10000000000000.01", "amount_out_of_range"),
])
def test_amounts_that_are_not_unambiguous_money_are_refused(text, code):
    with pytest.raises(ValueProblem) as caught:
        minor_units(text, "EUR")
    assert caught.value.code == code


def test_a_currency_without_decimals_refuses_any():
    assert minor_units("1000", "JPY") == 1000
    with pytest.raises(ValueProblem):
        minor_units("1000.5", "JPY")
    assert minor_units("1.234", "KWD") == 1234  # three decimals are the dinar's own: not ambiguous


@given(st.text(max_size=40))
def test_any_text_is_an_amount_or_a_clear_refusal(text):
    try:
        assert minor_units(text, "EUR") > 0
    except ValueProblem as problem:
        assert problem.code in {"ambiguous_amount", "too_many_decimals", "zero_amount", "invalid_amount",
                                "amount_out_of_range", "missing_amount"}


# ── dates and references ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize("text", ["2026-03-02", "20260302", "02.03.2026", "2026-03-02T10:00:00+01:00"])
def test_dates_banks_write(text):
    assert parse_date(text) == date(2026, 3, 2)


@pytest.mark.parametrize("text", ["03/02/2026", "2026-13-01", "2026-02-30", "yesterday", "2026-03-02X"])
def test_dates_that_are_ambiguous_or_wrong_are_refused(text):
    with pytest.raises(ValueProblem):
        parse_date(text)


@given(st.uuids())
def test_a_uuid_reference_is_recognised_however_it_is_written(value):
    canonical = str(value)
    for written in (canonical, canonical.upper(), value.hex, f"{{{canonical}}}", f"urn:uuid:{canonical}"):
        assert reference_uuid(written) == canonical


def test_a_reference_that_is_not_a_uuid_stays_text():
    assert reference_uuid("INV-2026-0042") is None
    assert reference_uuid(PAYMENT[:-1]) is None  # truncated: the fuzzy pass's business


# ── CSV ──────────────────────────────────────────────────────────────────────────────


def test_the_sandbox_csv():
    data = (b"booking_date,value_date,credit_debit,amount,currency,reference,type,processor_reference\n"
            + f"2026-03-02,2026-03-02,DBIT,125.00,EUR,{PAYMENT},payout,po_1\n".encode()
            + b"2026-03-02,2026-03-02,CRDT,5.00,EUR,6b2d3c9e-d0b8-4d34-80a7-bc8fde537a07,refund,re_1\n")
    lines, summary = lines_of("csv", data)
    assert [(l.direction, l.amount, l.currency, l.ref_uuid, l.bank_ref) for l in lines] == [
        ("DBIT", 12500, "EUR", PAYMENT, "po_1"),
        ("CRDT", 500, "EUR", "6b2d3c9e-d0b8-4d34-80a7-bc8fde537a07", "re_1")]
    assert (summary.period_start, summary.period_end, summary.lines) == (date(2026, 3, 2), date(2026, 3, 2), 2)


def test_a_bank_csv_with_bom_crlf_semicolons_decimal_commas_quotes_and_its_own_header_names():
    data = ("\ufeffWertstellung;Buchungstag;Betrag;Währung;Soll/Haben;Verwendungszweck;End-To-End-Id\r\n"
            f'02.03.2026;02.03.2026;"1.250,00";EUR;S;"Rechnung; 42";{PAYMENT.upper()}\r\n'
            "\r\n"
            '02.03.2026;03.03.2026;12,50;eur;H;"Gutschrift ""Bonus""";NOTPROVIDED\r\n').encode("utf-8")
    lines, _ = lines_of("csv", data)
    assert [(l.value_date, l.direction, l.amount, l.currency, l.ref_uuid, l.reference) for l in lines] == [
        (date(2026, 3, 2), "DBIT", 125000, "EUR", PAYMENT, PAYMENT.upper()),
        (date(2026, 3, 2), "CRDT", 1250, "EUR", None, None)]
    assert lines[1].booking_date == date(2026, 3, 3)


def test_signed_amounts_and_debit_credit_columns():
    signed = b"date,amount,currency,reference\n2026-03-02,-12.00,EUR,a\n2026-03-02,(3.00),EUR,b\n2026-03-02,4.00,EUR,c\n"
    assert [(l.direction, l.amount) for l in lines_of("csv", signed)[0]] == [("DBIT", 1200), ("DBIT", 300),
                                                                             ("CRDT", 400)]
    split = b"Date,Debit,Credit,Currency\n2026-03-02,12.00,,EUR\n2026-03-02,,7.5,EUR\n"
    assert [(l.direction, l.amount) for l in lines_of("csv", split)[0]] == [("DBIT", 1200), ("CRDT", 750)]


def test_latin1_exports_are_read():
    data = "Valuta;Betrag;Währung;Referenz\n02.03.2026;1,00;EUR;Müller\n".encode("latin-1")
    lines, _ = lines_of("csv", data)
    assert lines[0].reference == "Müller"


@pytest.mark.parametrize("body, code, line, column", [
    (b"value_date,amount,currency\n2026-03-02,1.00,EUR\n2026-03-02,12.3456,EUR\n", "too_many_decimals", 3, "amount"),
    (b"value_date,amount,currency\n2026-03-02,1.00,XTS\n", "unknown_currency", 2, "currency"),
    (b"value_date,amount,currency\n2026-03-02,,EUR\n", "missing_amount", 2, "amount"),
    (b"value_date,amount,currency\n2026-03-02,\"1,250\",EUR\n", "ambiguous_amount", 2, "amount"),
    (b"value_date,amount,currency\n2026-02-30,1.00,EUR\n", "invalid_date", 2, "value_date"),
    (b"value_date,amount,currency\n2026-03-02,1.00\n", "malformed_csv", 2, None),
    (b"value_date,amount,currency\n2026-03-02,\"1.00,EUR\n", "malformed_csv", None, None),
    (b"value_date,amount,currency,credit_debit\n2026-03-02,1.00,EUR,X\n", "invalid_direction", 2, "credit_debit"),
    (b"value_date,amount,currency,credit_debit\n2026-03-02,-1.00,EUR,CRDT\n", "conflicting_sign", 2, "amount"),
    (b"when,how much\n2026-03-02,1.00\n", "unrecognised_header", 1, None),
    (b"amount,amt,currency,date\n1,1,EUR,2026-03-02\n", "ambiguous_header", 1, "amt"),
    (b"value_date,amount,currency\n", "empty_statement", None, None),
    (b"", "empty_statement", None, None),
])
def test_malformed_csv_names_the_line_the_column_and_the_reason(body, code, line, column):
    found = rejected("csv", body)
    assert found.code == code
    if line is not None:
        assert found.line == line
    if column is not None:
        assert found.column == column


# ── camt.053 ─────────────────────────────────────────────────────────────────────────


def test_camt053_v08_entries_with_many_transaction_details():
    lines, summary = lines_of("camt053", (SAMPLES / "camt053_v08_batch.xml").read_bytes())
    assert summary.lines == 7 and summary.skipped == 1  # the pending entry is not booked
    assert (summary.period_start, summary.period_end) == (date(2026, 3, 2), date(2026, 3, 2))
    assert summary.account == "DE89370400440532013000"
    batch = [l for l in lines if l.entry_no == 2]
    assert [(l.amount, l.entry_amount) for l in batch] == [(10000, 60000), (20000, 60000), (30000, 60000)]
    no_amounts = [l for l in lines if l.entry_no == 5]
    assert [(l.amount, l.entry_amount) for l in no_amounts] == [(None, 9000), (None, 9000)]
    assert [l.direction for l in lines if l.entry_no == 4] == ["CRDT"]


def test_camt053_v02_shape():
    lines, summary = lines_of("camt053", (SAMPLES / "camt053_v02.xml").read_bytes())
    assert [(l.amount, l.ref_uuid, l.value_date) for l in lines] == [(12500, PAYMENT, date(2026, 3, 2))]
    assert summary.account == "0532013000"


def _camt(entries: str, *, version: str = "08", balances: str = "") -> bytes:
    return (f'<?xml version="1.0"?><Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.{version}">'
            f"<BkToCstmrStmt><Stmt><Id>S</Id><FrToDt><FrDtTm>2026-03-02T00:00:00</FrDtTm>"
            f"<ToDtTm>2026-03-02T23:59:59</ToDtTm></FrToDt>{balances}{entries}</Stmt></BkToCstmrStmt></Document>"
            ).encode()


def _entry(amount: str = "1.00", ccy: str = 'Ccy="EUR"', extra: str = "") -> str:
    return (f"<Ntry><Amt {ccy}>{amount}</Amt><CdtDbtInd>DBIT</CdtDbtInd><Sts><Cd>BOOK</Cd></Sts>"
            f"<ValDt><Dt>2026-03-02</Dt></ValDt>{extra}</Ntry>")


@pytest.mark.parametrize("data, code, element", [
    (_camt(_entry() + _entry("1.001")), "too_many_decimals", "Document/BkToCstmrStmt/Stmt[1]/Ntry[2]/Amt"),
    (_camt(_entry(ccy='Ccy="ABC"')), "unknown_currency", "Document/BkToCstmrStmt/Stmt[1]/Ntry[1]/Amt"),
    (_camt(_entry(ccy="")), "missing_currency", "Document/BkToCstmrStmt/Stmt[1]/Ntry[1]/Amt"),
    (_camt("<Ntry><CdtDbtInd>DBIT</CdtDbtInd><ValDt><Dt>2026-03-02</Dt></ValDt></Ntry>"), "missing_amount",
     "Document/BkToCstmrStmt/Stmt[1]/Ntry[1]/Amt"),
    (_camt(_entry(extra="<NtryDtls><TxDtls><Amt Ccy='EUR'>0.40</Amt></TxDtls><TxDtls><Amt Ccy='EUR'>0.50</Amt>"
                        "</TxDtls></NtryDtls>")), "entry_amount_mismatch", None),
    (_camt(_entry(), balances='<Bal><Tp><CdOrPrtry><Cd>OPBD</Cd></CdOrPrtry></Tp><Amt Ccy="EUR">10.00</Amt>'
                             '<CdtDbtInd>CRDT</CdtDbtInd></Bal><Bal><Tp><CdOrPrtry><Cd>CLBD</Cd></CdOrPrtry></Tp>'
                             '<Amt Ccy="EUR">10.00</Amt><CdtDbtInd>CRDT</CdtDbtInd></Bal>'),
     "balance_mismatch", "Document/BkToCstmrStmt/Stmt[1]"),
    (_camt(_entry(), version="13"), "unsupported_camt_version", "Document"),
    (b'<?xml version="1.0"?><Document xmlns="urn:iso:std:iso:20022:tech:xsd:pain.001.001.09"/>',
     "unsupported_format", "Document"),
    (_camt(_entry())[:-30], "malformed_xml", None),
])
def test_malformed_camt053_names_the_element_and_the_reason(data, code, element):
    found = rejected("camt053", data)
    assert found.code == code
    if element is not None:
        assert found.element == element
    assert found.line is not None or found.element is not None


def test_camt053_with_a_dtd_or_entities_is_refused_before_anything_expands():
    bomb = (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
            b'<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.08">&b;</Document>')
    assert rejected("camt053", bomb).code == "dtd_forbidden"
    external = (b'<?xml version="1.0"?><!DOCTYPE d SYSTEM "file:///etc/passwd">'
                b'<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.08"/>')
    assert rejected("camt053", external).code == "dtd_forbidden"


def test_camt053_is_streamed_in_chunks():
    entries = "".join(_entry(extra=f"<NtryDtls><TxDtls><Refs><EndToEndId>{uuid.uuid4()}</EndToEndId></Refs>"
                                   "</TxDtls></NtryDtls>") for _ in range(11_000))
    summary = StatementSummary(format="camt053")
    batches = list(parse("camt053", io.BytesIO(_camt(entries)), summary))
    assert len(batches) == 3 and sum(len(b) for b in batches) == 11_000 == summary.lines


# ── MT940 ────────────────────────────────────────────────────────────────────────────


def test_mt940_with_blocks_subfields_and_multiline_narratives():
    lines, summary = lines_of("mt940", (SAMPLES / "mt940_sepa.sta").read_bytes())
    assert [(l.direction, l.amount, l.ref_uuid, l.bank_ref) for l in lines] == [
        ("DBIT", 12500, "7c1e4daf-e1c9-4e45-91b8-cd90ef648b08", "B260302000001"),  # ?20/?21 EREF+, split
        ("DBIT", 10000, "8d0f5eb0-f2da-4f56-a2c9-dea1f0759c09", "B260302000002"),  # /EREF/
        ("DBIT", 20000, "9e1a6fc1-03eb-4a67-b3da-efb2a186ad10", "B260302000003"),  # UUID in the narrative
        ("CRDT", 2500, None, "B260302000004")]  # EREF+NOTPROVIDED: no reference
    assert lines[0].booking_date == date(2026, 3, 2)
    assert summary.account == "DE89370400440532013000"


def _mt940(*fields: str) -> bytes:
    return ("\r\n".join([":20:X", ":25:ACC", ":60F:C260301EUR100,00", *fields]) + "\r\n").encode()


@pytest.mark.parametrize("data, code, line", [
    (_mt940(":61:2603020302D10,001NTRFNONREF", ":62F:C260302EUR90,00"), "too_many_decimals", 4),
    (_mt940(":61:2603020302D10,00NTRFNONREF", ":62F:C260302EUR95,00"), "balance_mismatch", 5),
    (_mt940(":61:26030X0302D10,00NTRFNONREF"), "malformed_mt940", 4),
    (_mt940(":61:2602300230D10,00NTRFNONREF"), "invalid_date", 4),
    (b":20:X\r\n:61:2603020302D10,00NTRFNONREF\r\n", "missing_opening_balance", 2),
    (b":20:X\r\n:60F:C260301XYZ1,00\r\n", "unknown_currency", 2),
    (b"hello\r\n", "malformed_mt940", 1),
])
def test_malformed_mt940_names_the_line_and_the_reason(data, code, line):
    found = rejected("mt940", data)
    assert (found.code, found.line) == (code, line)


# ── no input crashes a parser ──────────────────────────────────────────────────────

_FRAGMENTS = {
    "csv": [b"value_date,amount,currency,reference\n", b"2026-03-02,", b"1.00", b",EUR,", PAYMENT.encode(), b"\n",
            b'"', b";", b"\r\n", b"1,250", b"\xff\xfe", b"DBIT", b",,,"],
    "camt053": [_camt(_entry())[:120], b"<Ntry>", b"</Ntry>", b"<Amt Ccy=\"EUR\">", b"1.00", b"</Amt>", b"&amp;",
                b"<!DOCTYPE x>", b"<TxDtls>", b"</TxDtls>", b"</Stmt></BkToCstmrStmt></Document>", b"\x00"],
    "mt940": [b":20:X\r\n", b":60F:C260301EUR100,00\r\n", b":61:2603020302D10,00NTRFNONREF\r\n", b":86:?20EREF+",
              b":62F:C260302EUR90,00\r\n", b"-}", b"{4:", b"\r\n", b"\xc3"],
}


@pytest.mark.parametrize("fmt", ["csv", "camt053", "mt940"])
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_any_file_is_lines_or_a_clear_refusal(fmt, data):
    pieces = data.draw(st.lists(st.one_of(st.sampled_from(_FRAGMENTS[fmt]), st.binary(max_size=24)), max_size=30))
    try:
        lines, summary = lines_of(fmt, b"".join(pieces))
    except StatementRejected as refusal:
        assert refusal.code and refusal.detail
        return
    assert summary.period_start is not None
    assert all(l.amount is None or l.amount > 0 for l in lines)
    assert all(l.direction in ("DBIT", "CRDT") for l in lines)


def test_content_types_name_formats():
    assert format_for("text/csv; charset=utf-8") == "csv"
    assert format_for("application/xml") == "camt053"
    assert format_for("text/plain") == "mt940"
    assert format_for("application/json") is None
    assert format_for(None) is None
