"""No input makes an endpoint answer 500: random JSON bodies, query strings, path ids,
content types and files all get a 2xx or a problem+json 4xx with a stable code."""

from __future__ import annotations

import uuid

from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from services.reconciliation.tests.integration.harness import headers

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                     lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children,
                                                                                      max_size=4), max_leaves=8)
_FIELDS = st.fixed_dictionaries({}, optional={
    "statement_id": st.one_of(st.text(max_size=70), st.uuids().map(str), st.integers()),
    "resolution": st.one_of(st.sampled_from(["accepted", "manual_match", "written_off", "nope"]), st.integers()),
    "reason": st.one_of(st.text(max_size=600), st.none()),
    "match": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "target_id": st.one_of(st.uuids().map(str), st.text(max_size=5)),
        "line_no": st.one_of(st.integers(-5, 3_000_000_000), st.text(max_size=3))})),
    "amount_tolerance_minor": st.one_of(st.integers(-10, 10**7), st.text(max_size=3)),
    "date_window_days": st.integers(-3, 100),
    "fuzzy": st.one_of(st.booleans(), st.integers(0, 1)),
})
_HYPOTHESIS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


def _acceptable(response) -> bool:
    if response.status_code >= 500:
        return False
    if response.status_code >= 400:
        return response.headers["content-type"] == "application/problem+json" and bool(response.json()["code"])
    return True


@hypothesis_settings(**_HYPOTHESIS)
@given(body=st.one_of(_FIELDS, _JSON), path_id=st.one_of(st.uuids().map(str), st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#%"), min_size=1, max_size=40)))
async def test_json_endpoints(client, private_pem, body, path_id):
    auth = headers(private_pem, tenant="t_fuzz")
    for method, url in (("POST", "/v1/reconciliation/runs"), ("PUT", "/v1/reconciliation/rules"),
                        ("POST", f"/v1/reconciliation/breaks/{path_id}/resolve"),
                        ("GET", f"/v1/reconciliation/runs/{path_id}"), ("GET", f"/v1/reconciliation/breaks/{path_id}"),
                        ("GET", f"/v1/reconciliation/statements/{path_id}")):
        response = await client.request(method, url, json=body, headers=auth)
        assert _acceptable(response), (method, url, response.status_code, response.text)


@hypothesis_settings(**_HYPOTHESIS)
@given(query=st.dictionaries(st.sampled_from(["run_id", "statement_id", "status", "type", "limit", "cursor", "x"]),
                             st.text(max_size=30), max_size=4))
async def test_break_filters(client, private_pem, query):
    response = await client.get("/v1/reconciliation/breaks", params=query, headers=headers(private_pem,
                                                                                          tenant="t_fuzz"))
    assert _acceptable(response), (query, response.status_code, response.text)


@hypothesis_settings(**_HYPOTHESIS)
@given(content=st.binary(max_size=300), content_type=st.sampled_from(
    ["text/csv", "application/xml", "text/plain", "application/json", "text/csv; charset=latin-1", "", "x/y"]))
async def test_statement_uploads(client, private_pem, content, content_type):
    response = await client.post("/v1/reconciliation/statements", content=content,
                                 headers=headers(private_pem, tenant=f"t_{uuid.uuid4().hex[:8]}",
                                                 content_type=content_type or None))
    assert _acceptable(response), (content, content_type, response.status_code, response.text)
