"""POST /v1/reconciliation/statements against the real database: the three formats in,
malformed files refused with the line or element and nothing kept, the same file twice
recognised, and the usual guarantees (auth, scopes, tenants, limits, idempotency)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from services.reconciliation.tests.integration.harness import headers, sandbox_csv, scalar, upload

SAMPLES = Path(__file__).parent.parent / "samples"
PROBLEM = "application/problem+json"


async def stored(sessionmaker, tenant: str) -> tuple[int, int, int]:
    """(statements, lines, events) the tenant has: what a refused upload must not change."""
    return (await scalar(sessionmaker, "SELECT count(*) FROM statements WHERE tenant_id = :t", t=tenant),
            await scalar(sessionmaker, "SELECT count(*) FROM statement_lines WHERE tenant_id = :t", t=tenant),
            await scalar(sessionmaker, "SELECT count(*) FROM events WHERE tenant_id = :t", t=tenant))


async def test_a_sandbox_csv_is_stored_with_its_lines_and_an_event(client, private_pem, tenant, sessionmaker):
    body = sandbox_csv([(str(uuid.uuid4()), 12_500, "EUR", "2026-03-02"), (str(uuid.uuid4()), 99, "EUR", "2026-03-02")])
    response = await upload(client, private_pem, tenant, body)
    assert response.status_code == 201, response.text
    found = response.json()
    assert (found["format"], found["lines"], found["duplicate"]) == ("csv", 2, False)
    assert (found["period_start"], found["period_end"]) == ("2026-03-02", "2026-03-02")
    assert response.headers["location"] == f"/v1/reconciliation/statements/{found['id']}"
    assert await stored(sessionmaker, tenant) == (1, 2, 1)
    assert await scalar(sessionmaker, "SELECT type FROM events WHERE tenant_id = :t", t=tenant) == \
        "reconciliation.statement.imported.v1"
    again = await client.get(f"/v1/reconciliation/statements/{found['id']}", headers=headers(private_pem, tenant=tenant))
    assert again.status_code == 200 and again.json()["id"] == found["id"]


async def test_the_same_file_twice_is_the_first_statement(client, private_pem, tenant, sessionmaker):
    body = sandbox_csv([(str(uuid.uuid4()), 500, "EUR", "2026-03-02")])
    first = await upload(client, private_pem, tenant, body)
    second = await upload(client, private_pem, tenant, body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"] and second.json()["duplicate"] is True
    assert await stored(sessionmaker, tenant) == (1, 1, 1)
    # Another tenant's identical file is that tenant's own statement.
    other = await upload(client, private_pem, f"{tenant}_other", body)
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


@pytest.mark.parametrize("sample, content_type, lines, skipped", [
    ("camt053_v08_batch.xml", "application/xml", 7, 1),
    ("camt053_v02.xml", "text/xml; charset=utf-8", 1, 0),
    ("mt940_sepa.sta", "text/plain", 4, 0),
])
async def test_bank_formats(client, private_pem, tenant, sample, content_type, lines, skipped):
    response = await upload(client, private_pem, tenant, (SAMPLES / sample).read_bytes(), content_type)
    assert response.status_code == 201, response.text
    assert (response.json()["lines"], response.json()["skipped"]) == (lines, skipped)
    assert response.json()["format"] == ("mt940" if content_type == "text/plain" else "camt053")


_GOOD_ROW = f"2026-03-02,2026-03-02,DBIT,1.00,EUR,{uuid.uuid4()},payout,po_1\n"
_HEADER = "booking_date,value_date,credit_debit,amount,currency,reference,type,processor_reference\n"


@pytest.mark.parametrize("body, content_type, code, where", [
    ((_HEADER + _GOOD_ROW * 3 + "2026-03-02,2026-03-02,DBIT,1.234,EUR,x,payout,po\n").encode(), "text/csv",
     "ambiguous_amount", {"line": 5, "column": "amount"}),
    ((_HEADER + _GOOD_ROW + "2026-03-02,2026-03-02,DBIT,1.2345,EUR,x,payout,po\n").encode(), "text/csv",
     "too_many_decimals", {"line": 3, "column": "amount"}),
    ((_HEADER + "2026-03-02,2026-03-02,DBIT,1.00,EURO,x,payout,po\n").encode(), "text/csv",
     "unknown_currency", {"line": 2, "column": "currency"}),
    ((_HEADER + "2026-03-02,2026-03-02,DBIT,,EUR,x,payout,po\n").encode(), "text/csv",
     "missing_amount", {"line": 2, "column": "amount"}),
    ((_HEADER + '2026-03-02,2026-03-02,DBIT,"1.00,EUR,x,payout,po\n').encode(), "text/csv", "malformed_csv", {}),
    (b'<?xml version="1.0"?><Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.08"><BkToCstmrStmt>',
     "application/xml", "malformed_xml", {"line": 1}),
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e "e">]><Document/>', "application/xml", "dtd_forbidden", {}),
    (b":20:X\r\n:60F:C260301EUR100,00\r\n:61:2603020302D10,00NTRFNONREF\r\n:62F:C260302EUR91,00\r\n",
     "text/plain", "balance_mismatch", {"line": 4, "element": ":62F:"}),
])
async def test_a_malformed_file_is_refused_whole_with_the_place_and_the_reason(
        client, private_pem, tenant, sessionmaker, body, content_type, code, where):
    response = await upload(client, private_pem, tenant, body, content_type)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["code"] == code and problem["detail"] and problem["trace_id"]
    assert {k: problem[k] for k in where} == where
    assert await stored(sessionmaker, tenant) == (0, 0, 0)  # nothing partial, no event


async def test_what_is_not_a_statement_is_refused_before_reading_it(client, private_pem, tenant, settings):
    wrong_type = await upload(client, private_pem, tenant, b"{}", "application/json")
    assert wrong_type.status_code == 415 and wrong_type.json()["code"] == "unsupported_media_type"
    empty = await upload(client, private_pem, tenant, b"")
    assert empty.status_code == 422 and empty.json()["code"] == "empty_statement"
    huge = await upload(client, private_pem, tenant, b"x" * (settings.statement_max_bytes + 1))
    assert huge.status_code == 413 and huge.json()["code"] == "payload_too_large"


async def test_a_json_body_keeps_the_small_limit(client, private_pem, tenant, settings):
    response = await client.post("/v1/reconciliation/runs", content=b"{" + b" " * settings.json_max_bytes + b"}",
                                 headers=headers(private_pem, tenant=tenant, content_type="application/json"))
    assert response.status_code == 413


async def test_tokens_scopes_and_tenants(client, private_pem, tenant):
    body = sandbox_csv([(str(uuid.uuid4()), 100, "EUR", "2026-03-02")])
    anonymous = await client.post("/v1/reconciliation/statements", content=body, headers={"Content-Type": "text/csv"})
    assert anonymous.status_code == 401
    reader = await upload(client, private_pem, tenant, body, scopes=("reconciliation:read",))
    assert reader.status_code == 403 and reader.json()["code"] == "insufficient_scope"
    created = await upload(client, private_pem, tenant, body)
    foreign = await client.get(f"/v1/reconciliation/statements/{created.json()['id']}",
                               headers=headers(private_pem, tenant=f"{tenant}_x"))
    assert foreign.status_code == 404
    nonsense = await client.get("/v1/reconciliation/statements/not-an-id", headers=headers(private_pem, tenant=tenant))
    assert nonsense.status_code == 404 and nonsense.json()["code"] == "statement_not_found"


async def test_an_idempotency_key_replays_the_first_answer(client, private_pem, tenant):
    body = sandbox_csv([(str(uuid.uuid4()), 100, "EUR", "2026-03-02")])
    first = await upload(client, private_pem, tenant, body, idempotency_key="upload-1")
    replay = await upload(client, private_pem, tenant, body, idempotency_key="upload-1")
    assert (first.status_code, replay.status_code) == (201, 201)
    assert replay.headers["idempotent-replayed"] == "true" and replay.json()["id"] == first.json()["id"]
    other = await upload(client, private_pem, tenant, body + b"\n", idempotency_key="upload-1")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
