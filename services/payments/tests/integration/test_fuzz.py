"""No input makes an endpoint answer 500: random bodies, headers, paths and query
strings against every route, on the real database. Every refusal is problem+json."""

from __future__ import annotations

import time

import json
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings, strategies as st

from services.payments.tests.integration.harness import IBAN, WEBHOOK_SECRET, asgi_client, headers, payment_body
from services.sandbox.processor import sign

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                         st.floats(allow_nan=False), st.text(max_size=60))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=12)
fields = st.sampled_from(["amount", "currency", "debit_account_id", "payee", "reference", "metadata", "name",
                          "iban", "reason", "extra"])


def near_valid_bodies():
    """Valid payments with one field replaced by anything: reaches past the parser."""
    return st.builds(lambda field, value: {**payment_body(), field: value}, fields, json_values)


def payee_bodies():
    return st.builds(lambda name, iban: payment_body(payee={"name": name, "iban": iban}),
                     st.text(max_size=160), st.one_of(st.text(max_size=40), st.just(IBAN)))


def encode(body) -> bytes:
    return json.dumps(body).encode()  # the stdlib writes integers of any size, as a client may


def assert_problem(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
        assert {"type", "title", "status", "detail", "code", "trace_id"} <= response.json().keys()


@FUZZ
@given(body=st.one_of(json_values, near_valid_bodies(), payee_bodies()))
async def test_create_never_fails_on_any_body(app, private_pem, body):
    async with asgi_client(app) as http:
        response = await http.post("/v1/payments", content=encode(body),
                                   headers={**headers(private_pem), "Content-Type": "application/json"})
    assert_problem(response)


@FUZZ
@given(raw=st.binary(max_size=300), key=st.text(max_size=300))
async def test_create_never_fails_on_any_bytes_or_idempotency_key(app, private_pem, raw, key):
    extra = {"Idempotency-Key": key} if key.isascii() and key.isprintable() and key == key.strip() else {}
    async with asgi_client(app) as http:
        response = await http.post("/v1/payments", content=raw, headers={
            **headers(private_pem), **extra, "Content-Type": "application/json"})
    assert_problem(response)


@FUZZ
@given(params=st.dictionaries(st.sampled_from(["status", "limit", "cursor", "created_gte", "created_lt", "x"]),
                              st.text(max_size=40), max_size=5))
async def test_list_never_fails_on_any_query(app, private_pem, params):
    async with asgi_client(app) as http:
        response = await http.get("/v1/payments", params=params, headers=headers(private_pem))
    assert_problem(response)


@FUZZ
@given(segment=st.text(min_size=1, max_size=80).filter(lambda s: "/" not in s and s not in (".", "..")),
       body=json_values)
async def test_routes_with_ids_never_fail(app, private_pem, segment, body):
    async with asgi_client(app) as http:
        for method, path in (("GET", "/v1/payments/{}"), ("GET", "/v1/payments/{}/history"),
                             ("POST", "/v1/payments/{}/cancel"), ("POST", "/v1/payments/{}/refunds"),
                             ("GET", "/v1/payments/{}/refunds"), ("GET", "/v1/payments/{}/refunds/{}")):
            url = path.format(*([quote(segment, safe="")] * path.count("{}")))
            content = encode(body) if method == "POST" else None
            response = await http.request(method, url, content=content, headers={
                **headers(private_pem), "Content-Type": "application/json"})
            assert_problem(response)


@FUZZ
@given(body=st.one_of(json_values, st.builds(lambda obj: {"id": "evt_f", "type": "payout.settled",
                                                           "data": {"object": obj}}, json_values)))
async def test_signed_webhooks_never_fail_on_any_body(app, body):
    raw = encode(body)
    signature = sign(WEBHOOK_SECRET.encode(), timestamp=int(time.time()), body=raw)
    async with asgi_client(app) as http:
        response = await http.post("/v1/payments/webhooks/sandbox", content=raw,
                                   headers={"Clearhouse-Signature": signature})
    assert_problem(response)
    assert response.status_code in (200, 400)
