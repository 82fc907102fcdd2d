"""Strict input handling: every malformed, hostile or out-of-range request gets a
problem+json answer with a stable code, never a 500 and never a database error."""

from __future__ import annotations

import json
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

READ = ("ledger:read",)


async def test_requests_need_a_token_and_the_right_scope(api):
    response = await api.http.post("/v1/ledger/accounts", json={"name": "x", "currency": "EUR",
                                                                "normal_balance": "credit"})
    assert response.status_code == 401 and response.json()["code"] == "invalid_internal_token"
    response = await api.post("/v1/ledger/accounts", {"name": "x", "currency": "EUR", "normal_balance": "credit"},
                              scopes=READ)
    assert response.status_code == 403 and response.json()["missing_scope"] == "ledger:write"
    account = await api.account()
    response = await api.get(f"/v1/ledger/accounts/{account['id']}/balance", scopes=("ledger:write",))
    assert response.status_code == 403 and response.json()["missing_scope"] == "ledger:read"


BAD_BODIES = [
    ({"name": "x", "currency": "EUR", "normal_balance": "credit", "extra": 1}, "/body/extra"),
    ({"name": "x", "currency": "eur", "normal_balance": "credit"}, "/body/currency"),
    ({"name": "x", "currency": "XAU", "normal_balance": "credit"}, "/body/currency"),
    ({"name": "x", "currency": "EUR", "normal_balance": "sideways"}, "/body/normal_balance"),
    ({"name": "x", "currency": "EUR", "normal_balance": "credit", "allow_negative": "yes"}, "/body/allow_negative"),
    ({"name": "", "currency": "EUR", "normal_balance": "credit"}, "/body/name"),
    ({"name": "a\u0000b", "currency": "EUR", "normal_balance": "credit"}, "/body/name"),
    ({"name": "a\ud800b", "currency": "EUR", "normal_balance": "credit"}, "/body/name"),
    ({"name": "x" * 201, "currency": "EUR", "normal_balance": "credit"}, "/body/name"),
    ({"name": "x", "currency": "EUR", "normal_balance": "credit", "metadata": {"k": 1}}, "/body/metadata/k"),
    ({"name": "x", "currency": "EUR", "normal_balance": "credit", "metadata": {"bad key": "v"}}, "/body/metadata"),
]


async def test_account_requests_are_validated_strictly(api):
    for body, pointer in BAD_BODIES:
        response = await api.post("/v1/ledger/accounts", content=json.dumps(body).encode())
        assert response.status_code == 422, (body, response.text)
        problem = response.json()
        assert problem["code"] == "validation_error"
        assert any(e["pointer"].startswith(pointer) for e in problem["errors"]), (pointer, problem)


async def test_transaction_amounts_are_strict_integers_in_range(api):
    alice, bob = await api.account(allow_negative=True), await api.account()
    for amount in (0, -1, 1.5, 10.0, "100", True, None, 10**15 + 1, 10**400):
        body = {"entries": [{"account_id": alice["id"], "direction": "debit", "amount": amount},
                            {"account_id": bob["id"], "direction": "credit", "amount": 1}]}
        response = await api.post("/v1/ledger/transactions", content=json.dumps(body).encode())
        assert response.status_code == 422, (amount, response.text)
        assert response.json()["errors"][0]["pointer"] == "/body/entries/0/amount"
    one_leg = {"entries": [{"account_id": alice["id"], "direction": "debit", "amount": 1}]}
    assert (await api.post("/v1/ledger/transactions", one_leg)).status_code == 422
    not_a_uuid = {"entries": [{"account_id": "abc", "direction": "debit", "amount": 1},
                              {"account_id": bob["id"], "direction": "credit", "amount": 1}]}
    assert (await api.post("/v1/ledger/transactions", not_a_uuid)).status_code == 422


async def test_totals_beyond_bigint_are_refused_not_overflowed(api):
    whale, sink = await api.account(allow_negative=True), await api.account()
    item = {"entries": [{"account_id": whale["id"], "direction": "debit", "amount": 10**15},
                        {"account_id": sink["id"], "direction": "credit", "amount": 10**15}]}
    # 10^18 (a thousand maximal amounts) is the bound on any running total: reached, not passed.
    assert (await api.post("/v1/ledger/transactions/bulk", {"transactions": [item] * 1000})).status_code == 201
    response = await api.post("/v1/ledger/transactions", item)
    assert response.status_code == 422 and response.json()["code"] == "balance_limit_exceeded"
    assert (await api.balance(sink["id"]))["posted"] == 10**18


async def test_malformed_and_hostile_bodies(api):
    hostile = (b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b"{\"entries\": " + b"[" * 50_000 + b"]" * 50_000 + b"}")
    for number, content in enumerate(hostile):
        response = await api.post("/v1/ledger/transactions", content=content, key=f"hostile-{number}")
        assert response.status_code in (400, 422), (content[:20], response.status_code, response.text[:200])
        assert response.headers["content-type"] == "application/problem+json"
    big = b'{"entries": [' + b",".join([b'{"account_id": "%s", "direction": "debit", "amount": 1}'
                                         % str(uuid.uuid4()).encode()] * 20_000) + b"]}"
    response = await api.post("/v1/ledger/transactions", content=big)
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"


async def test_path_and_query_parameters_are_validated(api):
    assert (await api.get("/v1/ledger/accounts/not-a-uuid")).status_code == 422
    assert (await api.get("/v1/ledger/transactions/123")).status_code == 422
    account = await api.account()
    for params in ({"limit": 0}, {"limit": 501}, {"limit": "x"}, {"order": "sideways"}):
        response = await api.get(f"/v1/ledger/accounts/{account['id']}/entries", params)
        assert response.status_code == 422, params
    assert (await api.get("/v1/ledger/accounts", {"currency": "euro"})).status_code == 422
    assert (await api.get("/v1/ledger/holds", {"status": "maybe"})).status_code == 422


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20),
                          st.floats(allow_nan=False), st.text(max_size=20))
_json = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)


def _entry(account_ids):
    return st.fixed_dictionaries(
        {"account_id": st.one_of(st.sampled_from(account_ids), st.uuids().map(str), _json),
         "direction": st.one_of(st.sampled_from(["debit", "credit"]), _json),
         "amount": st.one_of(st.integers(min_value=-5, max_value=2 * 10**15), _json)},
        optional={"currency": st.one_of(st.sampled_from(["EUR", "USD"]), _json), "x": _json})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_no_input_makes_the_ledger_answer_500(api, data):
    if not hasattr(api, "_fuzz_accounts"):
        api._fuzz_accounts = [(await api.account(allow_negative=True))["id"], (await api.account())["id"],
                              (await api.account(currency="USD"))["id"]]
    accounts = api._fuzz_accounts
    body = data.draw(st.one_of(
        st.fixed_dictionaries({"entries": st.lists(_entry(accounts), max_size=4)},
                              optional={"description": _json, "external_id": _json, "metadata": _json}),
        _json))
    path = data.draw(st.sampled_from(["/v1/ledger/transactions", "/v1/ledger/holds", "/v1/ledger/transactions/bulk",
                                      "/v1/ledger/accounts"]))
    if path.endswith("bulk") and isinstance(body, dict):
        body = {"transactions": [body], "atomic": data.draw(st.one_of(st.booleans(), _json))}
    if path.endswith("holds") and isinstance(body, dict) and body.get("entries"):
        first = body["entries"][0]
        body = {"debit_account_id": first.get("account_id"), "credit_account_id": data.draw(st.sampled_from(accounts)),
                "amount": first.get("amount"), "expires_at": data.draw(st.one_of(st.none(), _json))}
    response = await api.post(path, content=json.dumps(body).encode())
    assert response.status_code < 500, (path, body, response.text)
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"]


async def test_every_route_documents_its_problems(ledger_app):
    spec = ledger_app.openapi()
    operations = [(path, method, op) for path, ops in spec["paths"].items() if path.startswith("/v1/ledger")
                  for method, op in ops.items()]
    assert len(operations) == 15
    for path, method, op in operations:
        responses = op["responses"]
        assert {"401", "403", "422", "503"} <= set(responses), (method, path)
        if method == "post":
            assert {"400", "409", "413"} <= set(responses), (method, path)
        for code, response in responses.items():
            if code.startswith(("4", "5")):
                assert "application/problem+json" in response["content"], (method, path, code)
    post = spec["paths"]["/v1/ledger/transactions"]["post"]["responses"]["422"]["description"]
    assert "unbalanced_transaction" in post and "insufficient_funds" in post


_query_text = st.one_of(st.text(max_size=40), st.sampled_from(["\x00", "%00", "9" * 200, "-1", "", " ", "null"]))


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_no_query_makes_the_ledger_answer_500(api, data):
    if not hasattr(api, "_fuzz_account"):
        api._fuzz_account = (await api.account())["id"]
    account = api._fuzz_account
    path, names = data.draw(st.sampled_from([
        (f"/v1/ledger/accounts/{account}/entries", ["limit", "cursor", "order"]),
        (f"/v1/ledger/accounts/{account}/balance", ["as_of"]),
        ("/v1/ledger/accounts", ["limit", "cursor", "currency", "kind"]),
        ("/v1/ledger/transactions", ["limit", "cursor", "external_id"]),
        ("/v1/ledger/holds", ["limit", "cursor", "status", "account_id", "payment_id"]),
    ]))
    params = {name: data.draw(_query_text) for name in names if data.draw(st.booleans())}
    if "cursor" in params and data.draw(st.booleans()):  # a well-formed cursor around a hostile value
        import base64
        params["cursor"] = base64.urlsafe_b64encode(f"entries-asc:{params['cursor']}".encode()).decode()
    response = await api.get(path, params)
    assert response.status_code < 500, (path, params, response.text)


async def test_hostile_query_values_are_refused_cleanly(api):
    import base64

    account = (await api.account())["id"]
    huge = base64.urlsafe_b64encode(b"entries-asc:" + b"9" * 100).decode()
    cases = [(f"/v1/ledger/accounts/{account}/entries", {"cursor": huge}, 400),
             ("/v1/ledger/transactions", {"external_id": "a\x00b"}, 422),
             ("/v1/ledger/holds", {"payment_id": "\x00"}, 422),
             ("/v1/ledger/holds", {"account_id": "not-a-uuid"}, 422)]
    for path, params, status in cases:
        response = await api.get(path, params)
        assert response.status_code == status, (path, params, response.text)


async def test_an_unreachable_database_is_a_503_not_a_500(internal_keys):
    from clearhouse.embedded import free_port
    from services.ledger.api import create_app
    from services.ledger.settings import Settings
    from services.ledger.tests.integration.client import LedgerApi

    app = create_app(Settings(database_url=f"postgresql://nobody@127.0.0.1:{free_port()}/nothing",
                              INTERNAL_TOKEN_PUBLIC_KEY=internal_keys[1], db_pool_size=1))
    try:
        async with LedgerApi.connect(app, private_pem=internal_keys[0], tenant="t") as api:
            for response in (await api.get(f"/v1/ledger/accounts/{uuid.uuid4()}/balance"),
                             await api.post("/v1/ledger/accounts", {"name": "x", "currency": "EUR",
                                                                    "normal_balance": "credit"}, key="k")):
                assert response.status_code == 503, response.text
                assert response.json()["code"] == "database_busy" and response.headers["retry-after"] == "1"
    finally:
        await app.state.engine.dispose()
