"""Every text field of every POST/PUT body, and every query parameter of every GET, read
from the merged OpenAPI document, filled with what breaks careless code: NUL, a lone
surrogate (escaped in the JSON text, as a client may send it), right-to-left override,
emoji and combining marks, zero-width characters, overlong strings, and SQL-injection
shapes. Each answer is a 2xx or a problem+json 4xx, never a 5xx; afterwards the tenant's
data is intact (its balance and payment unchanged, no table of any service lost) and a
stored hostile string reads back as it was sent.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import asyncpg

from tests.hostile.world import body_for, document, operations, query_parameters, string_fields, with_value

UNICODE = ["nul\x00inside", "a\ud800b", "\u202eevil\u202c שלום", "💸🏦👩🏽‍💻 e\u0301\u0301", "\u200b\ufeff\x1b[31m\r\n"]
OVERLONG = ["é" * 100_000]
INJECTION = ["'; DROP TABLE events; --", "' OR '1'='1", "1; SELECT pg_sleep(5)--",
             "') UNION SELECT tenant_id, payload::text FROM events --", "$1 \\'; COPY events TO '/tmp/x'; --"]


def _acceptable(response) -> str | None:
    if response.status_code >= 500:
        return f"{response.status_code} {response.text[:200]}"
    if response.status_code >= 400:
        if not response.headers["content-type"].startswith("application/problem+json"):
            return f"{response.status_code} not problem+json: {response.headers['content-type']}"
        if not response.json().get("code"):
            return "problem without a code"
    return None


async def _tables(hostile) -> dict[str, set[str]]:
    found = {}
    for component in ("payments", "approvals", "ledger", "reconciliation", "gateway"):
        conn = await asyncpg.connect(hostile.database_url(component))
        try:
            found[component] = {r["tablename"] for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        finally:
            await conn.close()
    return found


async def _send_everywhere(hostile, world, values: list[str]) -> list[str]:
    doc = document(hostile.gateway)
    api = hostile.api(world.key)
    failures = []
    for op in operations(doc):
        if op.method in ("POST", "PUT") and op.json_body:
            base = body_for(op, world.ids)
            for path in string_fields(doc, op):
                for value in values:
                    # The raw JSON text: a lone surrogate stays the escape `\ud800`, as a client sends it.
                    raw = json.dumps(with_value(base, path, value)).encode()
                    response = await api.request(op.method, world.path(op.template), content=raw,
                                                 headers={"Content-Type": "application/json"})
                    if problem := _acceptable(response):
                        failures.append(f"{op.label} {'/'.join(map(str, path))}={value[:30]!r}: {problem}")
        elif op.method == "GET":
            for name in query_parameters(op):
                for value in values:
                    # Percent-encoded by hand: a lone surrogate has no UTF-8 form, so it goes as the
                    # bytes a careless client would send (WTF-8), which httpx would refuse to encode.
                    # Overlong, but within what a URL may carry (httpx refuses more than 64 KiB).
                    encoded = quote(value[:4_000].encode("utf-8", "surrogatepass"), safe="")
                    response = await api.http.get(f"{world.path(op.template)}?{name}={encoded}")
                    if problem := _acceptable(response):
                        failures.append(f"{op.label} ?{name}={value[:30]!r}: {problem}")
    await api.close()
    return failures


async def test_unicode_and_overlong_text_anywhere_is_answered_cleanly(hostile, world):
    failures = await _send_everywhere(hostile, world, UNICODE + OVERLONG)
    assert not failures, "\n".join(failures)


async def test_sql_injection_shapes_are_answered_normally_and_change_nothing(hostile, world):
    api = hostile.api(world.key)
    account = world.ids["account_id"]
    tables = await _tables(hostile)
    failures = await _send_everywhere(hostile, world, INJECTION)
    assert not failures, "\n".join(failures)
    assert await _tables(hostile) == tables
    # Stored verbatim, read back verbatim: data, not SQL.
    created = await api.created("/v1/ledger/accounts", {"name": INJECTION[0], "currency": "EUR",
                                                        "normal_balance": "credit"})
    assert (await api.get(f"/v1/ledger/accounts/{created['id']}")).json()["name"] == INJECTION[0]
    payment = await api.pay(account, 1_000, name=INJECTION[1], reference=INJECTION[4])
    assert (await api.get(f"/v1/payments/{payment['id']}")).json()["reference"] == INJECTION[4]
    listed = (await api.get("/v1/payments", status="' OR '1'='1")).json()
    assert listed.get("data", []) == [] or listed.get("code"), listed
    await api.close()


async def test_a_hostile_unicode_reference_round_trips(hostile, world):
    api = hostile.api(world.key)
    reference = "\u202eRTL 💸 שלום e\u0301"
    payment = await api.pay(world.ids["account_id"], 1_000, reference=reference)
    assert (await api.get(f"/v1/payments/{payment['id']}")).json()["reference"] == reference
    nul = await api.post("/v1/payments", {"amount": 1_000, "currency": "EUR", "debit_account_id": world.ids[
        "account_id"], "payee": {"name": "Jane\x00Doe", "iban": "DE89370400440532013000"}, "reference": "x"})
    assert 400 <= nul.status_code < 500, nul.text  # PostgreSQL text cannot hold NUL: refused, not a 500
    await api.close()
