"""Malformed bank statements through the gateway: real CSV, camt.053 and MT940 files,
mutated by hypothesis (truncated, lines dropped, duplicated or swapped, bytes and hostile
text spliced in, sent under the wrong content type), must each be read (201) or refused
with a problem+json 4xx naming what is wrong, never a 500. XML with a DTD, an entity bomb
or an external entity is refused before anything expands or any file is read.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "services" / "reconciliation" / "tests" / "samples"
CSV = (b"value_date,amount,currency,reference,credit_debit\n"
       b"2026-01-02,20.00,EUR,0b8f3c1e-6a52-4d8e-9a41-5c2f7e9d1a01,DBIT\n"
       b"2026-01-02,1234.56,EUR,invoice 7,CRDT\n")
FILES = {"csv": (CSV, "text/csv"),
         "camt053 v02": ((SAMPLES / "camt053_v02.xml").read_bytes(), "application/xml"),
         "camt053 v08": ((SAMPLES / "camt053_v08_batch.xml").read_bytes(), "application/xml"),
         "mt940": ((SAMPLES / "mt940_sepa.sta").read_bytes(), "text/plain")}
SPLICES = [b"\x00", b"\xff\xfe", b"\xed\xa0\x80", "\u202e".encode(), "💸".encode(), b"<", b"&", b"]]>",
           b"</Ntry>", b"<Amt Ccy=\"EUR\">-1</Amt>", b"99999999999999999999999.99", b"1e308", b"NaN",
           b":61:", b":20:", b"-}", b",,,,,,", b'"', b"\r", b"2026-02-30", b"9999-99-99", b"ZZZ", b"'; DROP--"]
CONTENT_TYPES = ["text/csv", "application/xml", "text/plain", "application/json", "text/csv; charset=latin-1",
                 "application/octet-stream", "multipart/form-data; boundary=x"]


def _acceptable(response: httpx.Response) -> bool:
    if response.status_code in (200, 201):  # 200: the same file again, answered with the first upload
        body = response.json()
        return bool(body["id"]) and body["format"] in ("csv", "camt053", "mt940") and "lines" in body
    return 400 <= response.status_code < 500 and response.headers["content-type"].startswith(
        "application/problem+json") and bool(response.json()["code"])


@st.composite
def mutated(draw) -> tuple[bytes, str]:
    original, content_type = FILES[draw(st.sampled_from(sorted(FILES)))]
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        lines = bytes(data).split(b"\n")
        kind = draw(st.sampled_from(["truncate", "drop", "duplicate", "swap", "splice", "random"]))
        at = draw(st.integers(0, max(len(lines) - 1, 0)))
        if kind == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
            continue
        if kind == "drop":
            del lines[at]
        elif kind == "duplicate":
            lines.insert(at, lines[at] if lines else b"")
        elif kind == "swap" and len(lines) > 1:
            other = draw(st.integers(0, len(lines) - 1))
            lines[at], lines[other] = lines[other], lines[at]
        elif kind in ("splice", "random") and lines:
            line = lines[at]
            cut = draw(st.integers(0, len(line)))
            insert = draw(st.sampled_from(SPLICES)) if kind == "splice" else draw(st.binary(min_size=1, max_size=12))
            lines[at] = line[:cut] + insert + line[cut + draw(st.integers(0, 8)):]
        data = bytearray(b"\n".join(lines))
    if draw(st.integers(0, 4)) == 0:
        content_type = draw(st.sampled_from(CONTENT_TYPES))
    return bytes(data), content_type


@pytest.fixture(scope="module")
async def uploader(hostile):
    key = await hostile.key()
    async with httpx.AsyncClient(base_url=hostile.gateway, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        yield http


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(statement=mutated())
async def test_mutated_statements_are_read_or_refused_never_a_500(uploader, statement):
    data, content_type = statement
    response = await uploader.post("/v1/reconciliation/statements", content=data, headers={
        "Content-Type": content_type, "Idempotency-Key": uuid.uuid4().hex})
    assert _acceptable(response), (content_type, data[:300], response.status_code, response.text[:500])


@pytest.mark.parametrize("name", sorted(FILES))
async def test_the_unmutated_files_are_read(uploader, name):
    data, content_type = FILES[name]
    if name == "csv":  # a fresh reference, so this upload is not the same statement as an earlier one
        data = data.replace(b"invoice 7", f"invoice {uuid.uuid4().hex[:6]}".encode())
    response = await uploader.post("/v1/reconciliation/statements", content=data, headers={
        "Content-Type": content_type, "Idempotency-Key": uuid.uuid4().hex})
    assert response.status_code in (200, 201) and response.json()["lines"], response.text


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
<!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
<!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
<!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
<!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
<!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">]>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.02"><BkToCstmrStmt><Stmt><Id>&lol9;</Id>
</Stmt></BkToCstmrStmt></Document>"""
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.02"><BkToCstmrStmt><Stmt><Id>&xxe;</Id>
</Stmt></BkToCstmrStmt></Document>"""
DEEP = b"<Document>" + b"<a>" * 100_000 + b"</a>" * 100_000 + b"</Document>"


@pytest.mark.parametrize("name,data", [("entity bomb", BOMB), ("external entity", XXE), ("deep nesting", DEEP)])
async def test_hostile_xml_is_refused_before_it_expands(uploader, name, data):
    started = time.monotonic()
    response = await uploader.post("/v1/reconciliation/statements", content=data, headers={
        "Content-Type": "application/xml", "Idempotency-Key": uuid.uuid4().hex})
    assert 400 <= response.status_code < 500, response.text[:300]
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "root:" not in response.text and "lollol" not in response.text
    assert time.monotonic() - started < 30
