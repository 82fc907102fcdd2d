"""One OpenAPI document for the public API, merged from the running services, with the
gateway's authentication and errors; a service that is down is named, then retried."""

from __future__ import annotations

import asyncio

import httpx

from clearhouse.embedded import free_port
from gateway.tests.conftest import Served, service_app


def operations(doc: dict):
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield path, method, operation


async def test_the_merged_document_covers_the_services_with_the_gateways_auth_and_errors(stack, client):
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    paths = set(doc["paths"])
    assert {"/v1/payments", "/v1/payments/{payment_id}/timeline", "/v1/approvals", "/v1/ledger/accounts"} <= paths
    assert not [p for p in paths if not p.startswith("/v1/")], "probes and /internal stay private"
    assert doc["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    schemas = doc["components"]["schemas"]
    assert "ledger.AccountPublic" in schemas and "payments.PaymentPublic" in schemas and "Problem" in schemas
    refs = {v for v in _walk(doc) if isinstance(v, str) and v.startswith("#/components/")}
    assert all(ref.split("/", 3)[3] in doc["components"][ref.split("/")[2]] for ref in refs), "no dangling $ref"
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(ids) == len(set(ids))
    for path, method, operation in operations(doc):
        if path.startswith("/v1/payments/webhooks"):
            assert operation["security"] == []
            continue
        assert operation["security"] == [{"ApiKey": []}], (path, method)
        assert operation["x-clearhouse-scope"] and {"401", "403", "429", "503", "504"} <= set(operation["responses"])
    balance = doc["paths"]["/v1/ledger/accounts/{account_id}/balance"]["get"]
    assert balance["x-clearhouse-scope"] == "ledger:read"
    create = doc["paths"]["/v1/payments"]["post"]
    assert create["x-clearhouse-scope"] == "payments:write" and "413" in create["responses"]
    get_payment = doc["paths"]["/v1/payments/{payment_id}"]["get"]
    assert any(p["name"] == "expand" for p in get_payment["parameters"])
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


async def test_a_service_down_at_start_is_named_then_merged_once_it_answers(stack):
    port = free_port()
    async with stack.another_gateway(ledger_url=f"http://127.0.0.1:{port}", openapi_retry_s=0.1) as gw, \
            httpx.AsyncClient(base_url=gw.url) as http:
        early = (await http.get("/openapi.json")).json()
        assert early["info"]["x-clearhouse-unavailable"] == ["ledger"]
        assert not [p for p in early["paths"] if p.startswith("/v1/ledger")] and "/v1/payments" in early["paths"]
        ledger = await Served(service_app("ledger", stack.databases["ledger"].app_url, stack.public_pem,
                                          stack.platform.bootstrap), port=port).start()
        try:
            await asyncio.sleep(0.2)
            later = (await http.get("/openapi.json")).json()
        finally:
            await ledger.stop()
    assert "x-clearhouse-unavailable" not in later["info"] and "/v1/ledger/accounts" in later["paths"]


def _walk(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
    else:
        yield node
