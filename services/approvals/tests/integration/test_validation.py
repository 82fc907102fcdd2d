"""No input makes the API answer 500: arbitrary JSON bodies, query strings and ids get a
problem+json 4xx (or a success), never a stack trace."""

from __future__ import annotations

import base64
import json
import uuid
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

SCALARS = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) \
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                        max_size=4), max_leaves=12)
FIELDS = ["decision", "reason", "subject_type", "subject_id", "amount", "currency", "metadata", "created_by",
          "rules", "expire_after_seconds", "escalate_after_seconds", "expected_version", "name", "conditions",
          "required_approvals", "approver_scopes", "approver_principals"]
# Bodies shaped like the real ones, with any values, reach deeper than random JSON does.
SHAPED = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6)
TEXT_WITH_TRAPS = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(["\x00", "\ud800", "'", "%"]),
                          max_size=30)
SETTINGS = hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def assert_no_500(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"]


@SETTINGS
@given(body=JSON | SHAPED, route=st.sampled_from(["/v1/approvals", "/v1/approvals/{id}/decisions",
                                                  "/v1/approvals/policies/payee"]))
async def test_any_json_body(http, as_, body, route):
    approval_id = uuid.uuid4()
    method = "PUT" if "policies" in route else "POST"
    response = await http.request(method, route.format(id=approval_id), json=body, headers=as_("fuzzer"))
    assert_no_500(response)


@SETTINGS
@given(raw=st.binary(max_size=64) | TEXT_WITH_TRAPS.map(lambda s: s.encode("utf-8", "surrogatepass")))
async def test_bytes_that_are_not_json(http, as_, raw):
    response = await http.post("/v1/approvals", content=raw,
                               headers={**as_("fuzzer"), "content-type": "application/json"})
    assert_no_500(response)


@SETTINGS
@given(status=TEXT_WITH_TRAPS, subject_type=TEXT_WITH_TRAPS, limit=TEXT_WITH_TRAPS, cursor=TEXT_WITH_TRAPS,
       version=TEXT_WITH_TRAPS)
async def test_any_query_string(http, as_, status, subject_type, limit, cursor, version):
    listing = await http.get("/v1/approvals", params={"status": status, "subject_type": subject_type, "limit": limit,
                                                      "cursor": cursor}, headers=as_("fuzzer"))
    policy = await http.get("/v1/approvals/policies/payee", params={"version": version}, headers=as_("fuzzer"))
    assert_no_500(listing)
    assert_no_500(policy)


@SETTINGS
@given(segment=TEXT_WITH_TRAPS)
async def test_any_path_segment(http, as_, segment):
    encoded = quote(segment.encode("utf-8", "surrogatepass"), safe="")
    for method, path in (("GET", f"/v1/approvals/{encoded}"), ("POST", f"/v1/approvals/{encoded}/decisions"),
                         ("GET", f"/v1/approvals/policies/{encoded}")):
        response = await http.request(method, path, json={"decision": "approve"}, headers=as_("fuzzer"))
        assert_no_500(response)


@SETTINGS
@given(cursor=st.builds(lambda a, b: base64.urlsafe_b64encode(json.dumps([a, b]).encode()).decode(), JSON, JSON))
async def test_forged_cursors(http, as_, cursor):
    response = await http.get("/v1/approvals", params={"cursor": cursor}, headers=as_("fuzzer"))
    assert_no_500(response)
    assert response.status_code in (200, 400, 422)  # 422: longer than a cursor can be


async def test_strings_postgres_cannot_store_are_a_422(http, as_):
    for body in ({"subject_type": "payee", "subject_id": "nul\x00"},
                 {"subject_type": "payee", "subject_id": "p-1", "metadata": {"k": "\ud800"}}):
        response = await http.post("/v1/approvals", content=json.dumps(body).encode(),
                                   headers={**as_("fuzzer"), "content-type": "application/json"})
        assert response.status_code == 422, response.text


async def test_payments_cannot_be_requested_over_the_api(http, as_):
    response = await http.post("/v1/approvals", json={"subject_type": "payment", "subject_id": str(uuid.uuid4()),
                                                      "amount": 1, "currency": "EUR"}, headers=as_("sneaky"))
    assert response.status_code == 422
    assert "payment.created" in json.dumps(response.json()["errors"])
