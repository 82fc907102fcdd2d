"""The sandbox's daily settlement statement, as CSV and as ISO 20022 camt.053.001.08.

A statement covers one value date (the period 00:00:00-23:59:59.999 UTC of that day) of
the sandbox settlement account, one account per currency: settled payouts are debits
(DBIT), succeeded refunds credits (CRDT). Every line refers to the Clearhouse object by
its id as end-to-end reference: a payout line carries the payment's id (camt.053
`EndToEndId`, CSV `reference`), a refund line the refund's id. Amounts are in major units
with the currency's exponent ("12.34" EUR, "1000" JPY), never floats.

Pure functions: no I/O, no clock (the caller passes the creation time).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from typing import Any
from xml.etree import ElementTree as ET

from shared.money import format_minor

CAMT053_NS = "urn:iso:std:iso:20022:tech:xsd:camt.053.001.08"
CSV_COLUMNS = ["booking_date", "value_date", "credit_debit", "amount", "currency", "reference", "type",
               "processor_reference"]
DEFAULT_CURRENCY = "EUR"


def day_entries(entries: Iterable[Mapping[str, Any]], day: date) -> list[Mapping[str, Any]]:
    return [e for e in entries if e["value_date"] == day.isoformat()]


def opening_balances(entries: Iterable[Mapping[str, Any]], day: date) -> dict[str, int]:
    """Signed balance per currency (credits positive) from everything booked before `day`."""
    balances: dict[str, int] = defaultdict(int)
    for entry in entries:
        if entry["value_date"] < day.isoformat():
            balances[entry["currency"]] += _signed(entry)
        else:
            balances.setdefault(entry["currency"], 0)
    return dict(balances)


def render_csv(entries: Iterable[Mapping[str, Any]], day: date) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in day_entries(entries, day):
        writer.writerow([entry["value_date"], entry["value_date"], entry["credit_debit"],
                         format_minor(entry["amount"], entry["currency"]), entry["currency"], entry["end_to_end_id"],
                         entry["kind"], entry["id"]])
    return out.getvalue()


def render_camt053(entries: list[Mapping[str, Any]], day: date, *, account_id: str, created_at: datetime) -> bytes:
    ET.register_namespace("", CAMT053_NS)
    q = lambda tag: f"{{{CAMT053_NS}}}{tag}"  # noqa: E731 - a qualified-name helper, nothing more

    def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
        element = ET.SubElement(parent, q(tag), attrs)
        if text is not None:
            element.text = text
        return element

    created = created_at.isoformat(timespec="seconds")
    document = ET.Element(q("Document"))
    root = sub(document, "BkToCstmrStmt")
    header = sub(root, "GrpHdr")
    sub(header, "MsgId", f"SANDBOX-{day:%Y%m%d}-{created_at:%H%M%S}")
    sub(header, "CreDtTm", created)

    booked = day_entries(entries, day)
    openings = opening_balances(entries, day) or {DEFAULT_CURRENCY: 0}
    for currency in sorted(openings):
        lines = [e for e in booked if e["currency"] == currency]
        opening = openings[currency]
        closing = opening + sum(_signed(e) for e in lines)
        statement = sub(root, "Stmt")
        sub(statement, "Id", f"SANDBOX-{currency}-{day:%Y%m%d}")
        sub(statement, "ElctrncSeqNb", str(day.toordinal()))
        sub(statement, "CreDtTm", created)
        period = sub(statement, "FrToDt")
        sub(period, "FrDtTm", f"{day.isoformat()}T00:00:00+00:00")
        sub(period, "ToDtTm", f"{day.isoformat()}T23:59:59+00:00")
        account = sub(statement, "Acct")
        other = sub(sub(account, "Id"), "Othr")
        sub(other, "Id", f"{account_id}-{currency}")
        sub(account, "Ccy", currency)
        for code, amount in (("OPBD", opening), ("CLBD", closing)):
            balance = sub(statement, "Bal")
            sub(sub(sub(balance, "Tp"), "CdOrPrtry"), "Cd", code)
            sub(balance, "Amt", format_minor(abs(amount), currency), Ccy=currency)
            sub(balance, "CdtDbtInd", "CRDT" if amount >= 0 else "DBIT")
            sub(sub(balance, "Dt"), "Dt", day.isoformat())
        summary = sub(statement, "TxsSummry")
        total = sub(summary, "TtlNtries")
        sub(total, "NbOfNtries", str(len(lines)))
        sub(total, "Sum", format_minor(sum(e["amount"] for e in lines), currency))
        net = closing - opening
        net_entry = sub(total, "TtlNetNtry")
        sub(net_entry, "Amt", format_minor(abs(net), currency))
        sub(net_entry, "CdtDbtInd", "CRDT" if net >= 0 else "DBIT")
        for tag, side in (("TtlCdtNtries", "CRDT"), ("TtlDbtNtries", "DBIT")):
            part = [e for e in lines if e["credit_debit"] == side]
            totals = sub(summary, tag)
            sub(totals, "NbOfNtries", str(len(part)))
            sub(totals, "Sum", format_minor(sum(e["amount"] for e in part), currency))
        for entry in lines:
            amount = format_minor(entry["amount"], currency)
            item = sub(statement, "Ntry")
            sub(item, "NtryRef", entry["id"])
            sub(item, "Amt", amount, Ccy=currency)
            sub(item, "CdtDbtInd", entry["credit_debit"])
            sub(sub(item, "Sts"), "Cd", "BOOK")
            sub(sub(item, "BookgDt"), "Dt", entry["value_date"])
            sub(sub(item, "ValDt"), "Dt", entry["value_date"])
            sub(item, "AcctSvcrRef", entry["id"])
            domain = sub(sub(item, "BkTxCd"), "Domn")
            sub(domain, "Cd", "PMNT")
            fmly = sub(domain, "Fmly")
            # Issued credit transfer (a payout) / received credit transfer (a refund coming back).
            sub(fmly, "Cd", "ICDT" if entry["credit_debit"] == "DBIT" else "RCDT")
            sub(fmly, "SubFmlyCd", "ESCT")
            details = sub(sub(item, "NtryDtls"), "TxDtls")
            refs = sub(details, "Refs")
            sub(refs, "AcctSvcrRef", entry["id"])
            sub(refs, "EndToEndId", entry["end_to_end_id"])
            sub(details, "Amt", amount, Ccy=currency)
            sub(details, "CdtDbtInd", entry["credit_debit"])
    return ET.tostring(document, encoding="utf-8", xml_declaration=True)


def _signed(entry: Mapping[str, Any]) -> int:
    return entry["amount"] if entry["credit_debit"] == "CRDT" else -entry["amount"]
