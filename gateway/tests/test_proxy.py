"""Routing through the gateway: bodies limited, upstream failures named, headers and
trace context carried, webhooks let through without a key, no 500 for any input."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.tests.conftest import WEBHOOK_SECRET
from gateway.tests.conftest import assert_problem, bearer, tenant


async def approvals_key(stack, t: str | None = None) -> str:
    return await stack.key(tenant=t or tenant(), scopes=["approvals:read", "approvals:request", "approvals:decide"])


async def test_idempotency_key_reaches_the_service_and_a_retry_replays(stack, client):
    key = await approvals_key(stack)
    body = {"subject_type": "payee", "subject_id": f"payee-{uuid.uuid4().hex[:8]}"}
    headers = {**bearer(key), "Idempotency-Key": uuid.uuid4().hex}
    first = await client.post("/v1/approvals", headers=headers, json=body)
    again = await client.post("/v1/approvals", headers=headers, json=body)
    assert first.status_code == 201, first.text
    assert again.status_code == 201 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert first.headers["location"] == f"/v1/approvals/{first.json()['id']}"
    fetched = await client.get(first.headers["location"], headers=bearer(key))
    assert fetched.status_code == 200 and fetched.json()["id"] == first.json()["id"]


async def test_request_ids_are_the_callers_or_fresh_and_reach_the_service(stack, client):
    key = await approvals_key(stack)
    mine = await client.get("/v1/approvals", headers={**bearer(key), "Request-Id": "req-abc-123",
                                                      "X-Correlation-Id": "flow-9"})
    assert mine.headers["request-id"] == "req-abc-123" and mine.headers["x-correlation-id"] == "flow-9"
    fresh = await client.get("/v1/approvals", headers={**bearer(key), "Request-Id": "bad id with spaces"})
    assert fresh.headers["request-id"] != "bad id with spaces" and len(fresh.headers["request-id"]) == 32
    body = {"subject_type": "payee", "subject_id": f"payee-{uuid.uuid4().hex[:8]}"}
    created = await client.post("/v1/approvals", json=body,
                                headers={**bearer(key), "X-Correlation-Id": "flow-10"})
    detail = (await client.get(f"/v1/approvals/{created.json()['id']}", headers=bearer(key))).json()
    assert {e["correlation_id"] for e in detail["history"]} == {"flow-10"}


async def test_oversized_bodies_are_413_whether_declared_or_streamed(stack):
    key = await approvals_key(stack)
    async with stack.another_gateway(max_body_bytes=1000) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        declared = await http.post("/v1/approvals", headers={**bearer(key), "Content-Type": "application/json"},
                                   content=b"x" * 1001)
        assert_problem(declared, 413, "payload_too_large")

        async def chunks():
            for _ in range(20):
                yield b"y" * 100

        streamed = await http.post("/v1/approvals", headers={**bearer(key), "Content-Type": "application/json"},
                                   content=chunks())
        assert "content-length" not in streamed.request.headers
        assert_problem(streamed, 413, "payload_too_large")
        small = await http.post("/v1/approvals", headers=bearer(key),
                                json={"subject_type": "payee", "subject_id": uuid.uuid4().hex[:12]})
        assert small.status_code == 201, small.text


async def test_a_stopped_service_is_a_503_naming_it_and_the_others_still_answer(stack):
    key = await stack.key(tenant=tenant(), scopes=["approvals:read", "ledger:read"])
    async with stack.another_service("approvals") as approvals:
        async with stack.another_gateway(approvals_url=approvals.url) as gw, \
                httpx.AsyncClient(base_url=gw.url) as http:
            assert (await http.get("/v1/approvals", headers=bearer(key))).status_code == 200
            await approvals.stop()
            down = await http.get("/v1/approvals", headers=bearer(key))
            body = assert_problem(down, 503, "upstream_unavailable")
            assert body["service"] == "approvals" and down.headers["retry-after"] == "1"
            other = await http.get("/v1/ledger/accounts/a/balance", headers=bearer(key))
            assert other.status_code != 503


async def test_an_upstream_that_never_answers_is_a_504_naming_it(stack):
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing: a hung process

    black_hole = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = black_hole.sockets[0].getsockname()[1]
    key = await stack.key(tenant=tenant(), scopes=["ledger:read"])
    try:
        async with stack.another_gateway(ledger_url=f"http://127.0.0.1:{port}", ledger_timeout_s=0.3) as gw, \
                httpx.AsyncClient(base_url=gw.url) as http:
            response = await http.get("/v1/ledger/accounts/a/balance", headers=bearer(key))
        body = assert_problem(response, 504, "upstream_timeout")
        assert body["service"] == "ledger" and "Idempotency-Key" in body["detail"]
    finally:
        for writer in accepted:
            writer.close()
        black_hole.close()
        await black_hole.wait_closed()


async def test_beyond_the_in_flight_limit_the_gateway_sheds_at_once(stack):
    """A hung upstream holds its slots; the next request is refused at once, not queued."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    black_hole = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = black_hole.sockets[0].getsockname()[1]
    key = await stack.key(tenant=tenant(), scopes=["ledger:read"])
    try:
        async with stack.another_gateway(ledger_url=f"http://127.0.0.1:{port}", ledger_timeout_s=3,
                                         upstream_max_pending=2) as gw, httpx.AsyncClient(base_url=gw.url) as http:
            hung = [asyncio.create_task(http.get("/v1/ledger/accounts/a/balance", headers=bearer(key)))
                    for _ in range(2)]
            while len(accepted) < 2:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            shed = await http.get("/v1/ledger/accounts/a/balance", headers=bearer(key))
            assert time.monotonic() - started < 1
            body = assert_problem(shed, 503, "upstream_busy")
            assert body["service"] == "ledger" and shed.headers["retry-after"] == "1"
            assert {(await t).status_code for t in hung} == {504}
    finally:
        for writer in accepted:
            writer.close()
        black_hole.close()
        await black_hole.wait_closed()


async def test_processor_webhooks_pass_without_a_key_with_their_signature_intact(stack, client):
    """The gateway asks no key of the processor; payments verifies its HMAC. A body signed
    with the processor's secret gets past that check (and is then judged on its content),
    so the signature header and the body bytes arrived untouched."""
    body = b'{"id": "evt_1", "not": "a sandbox event"}'
    now = int(time.time())  # the processor's scheme (Stripe's): HMAC-SHA256 over "<t>." + body
    digest = hmac.new(WEBHOOK_SECRET.encode(), f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    signature = f"t={now},v1={digest}"
    signed = await client.post("/v1/payments/webhooks/sandbox", content=body,
                               headers={"Content-Type": "application/json", "Clearhouse-Signature": signature})
    assert_problem(signed, 400, "malformed_webhook")
    forged = await client.post("/v1/payments/webhooks/sandbox", content=body,
                               headers={"Content-Type": "application/json", "Clearhouse-Signature": "t=1,v1=00"})
    assert_problem(forged, 401, "invalid_webhook_signature")
    assert_problem(await client.get("/v1/payments/webhooks/sandbox"), 401, "missing_api_key")


async def test_unknown_paths_and_methods_are_problems(stack, client):
    key = await approvals_key(stack)
    assert_problem(await client.get("/v1/users", headers=bearer(key)), 404, "not_found")
    assert_problem(await client.get("/internal/timeline?payment_id=x", headers=bearer(key)), 404, "not_found")
    # Percent-encoded, since httpx would resolve plain dot segments before sending them.
    dotted = await client.get("/v1/approvals/x/%2e%2e/%2e%2e/ledger/accounts", headers=bearer(key))
    assert_problem(dotted, 404, "not_found")
    assert_problem(await client.request("OPTIONS", "/v1/approvals", headers=bearer(key)), 405,
                   "method_not_allowed")


_PATH_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters='"<>\\^`{|}#?')
_HEADER_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0xff, exclude_characters="\x7f",
                              exclude_categories=["Cc"])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.text(alphabet=_PATH_CHARS, max_size=40),
       method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
       auth=st.one_of(st.none(), st.text(alphabet=_HEADER_CHARS, max_size=80),
                      st.sampled_from(["Bearer ", "Bearer ch_live_", "Bearer ch_live_0123456789abcdef_" + "A" * 43])),
       body=st.binary(max_size=200))
async def test_no_input_gets_a_500(stack, path, method, auth, body):
    """Any path, method, Authorization value and body a valid HTTP request can carry.
    (Bytes that are not HTTP at all are refused by uvicorn's parser before any app runs.)"""
    value = (auth or "").strip(" \t")  # h11 will not send a value with surrounding whitespace
    headers = {"Authorization": value.encode("latin-1")} if value else {}
    async with httpx.AsyncClient(base_url=stack.gateway.url) as http:
        response = await http.request(method, "/v1/" + path.lstrip("/"), headers=headers,
                                      content=body if method != "GET" else None)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
