"""Schemathesis against the gateway's merged OpenAPI document (`/openapi.json`), on the
running platform, with an API key holding every scope: requests generated from the
document itself, valid ones and ones that break it, must never get a 5xx, and every
answer must be one the document declares (status, content type, body schema, headers).

Bounded for CI: a few examples per operation and generation mode (about 40 operations x
3 modes). Path parameters are generated, and in one mode taken from objects that exist,
so that the services' logic behind the 404s is reached too. Failures of all operations
are collected, then reported together with schemathesis' curl reproduction.

Not checked: `positive_data_acceptance` (the document cannot say that a currency must be
an active ISO 4217 code or that a cursor must be one the API issued, so schema-valid
requests are rightly refused) and `negative_data_rejection` (unknown query parameters
and headers are ignored on purpose, not refused).
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks as openapi_checks

from tests.hostile.conftest import iban

CHECKS = [not_a_server_error, openapi_checks.status_code_conformance, openapi_checks.content_type_conformance,
          openapi_checks.response_schema_conformance, openapi_checks.response_headers_conformance]
EXAMPLES = 15


@pytest.fixture(scope="module")
async def fuzzing(hostile):
    key = await hostile.key()
    api = hostile.api(key)
    account = await api.funded_account()
    payment = await api.pay(account, 2_000, name="Fuzz Payee", iban_=iban("DE", "100100100000000001"))
    statement = await api.http.post("/v1/reconciliation/statements", content=(
        "date,amount,currency,reference,direction\n2026-01-02,20.00,EUR,ref-1,DBIT\n").encode(),
        headers={"Content-Type": "text/csv", "Idempotency-Key": "fuzz-statement"})
    known = {"account_id": account, "payment_id": payment["id"], "processor": "sandbox",
             "subject_type": "payment"}
    if statement.status_code == 201:
        known["statement_id"] = statement.json()["id"]
    await api.close()
    document = httpx.get(f"{hostile.gateway}/openapi.json", timeout=30).json()
    assert not document["info"].get("x-clearhouse-unavailable"), document["info"]
    return schemathesis.openapi.from_dict(document), key, known


@pytest.mark.parametrize("mode", ["positive", "positive with existing ids", "negative"])
def test_no_generated_request_gets_a_5xx_or_an_undocumented_answer(hostile, fuzzing, mode):
    schema, key, known = fuzzing
    headers = {"Authorization": f"Bearer {key}"}
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 35, [op.label for op in operations]
    for operation in operations:
        fixed = {}
        if mode == "positive with existing ids":
            names = {p.name for p in operation.path_parameters}
            fixed = {name: value for name, value in known.items() if name in names}
        strategy = operation.as_strategy(
            generation_mode=GenerationMode.NEGATIVE if mode == "negative" else GenerationMode.POSITIVE,
            path_parameters=fixed or None)

        @given(case=strategy)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def exercise(case):
            case.call_and_validate(base_url=hostile.gateway, headers=headers, checks=CHECKS, timeout=60)

        try:
            exercise()
        except Exception as exc:  # noqa: BLE001 - every operation's failure is collected, then reported
            failures[operation.label] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"===== {label}\n{text}" for label, text in failures.items())
