"""The operations console's sessions and forms against the real stack (four services and
the gateway over TCP, real keys): signing in exchanges a key for an HttpOnly, SameSite
cookie whose token is stored hashed; forms need the session's CSRF token; signing out,
revoking the key or idling ends the session; decisions go through the approvals service
as the signed-in principal (the maker is refused there); failures are pages, not traces."""

from __future__ import annotations

import re
import uuid

import asyncpg
import httpx
import pytest

from gateway.console.sessions import hash_token
from gateway.keys import revoke_key
from gateway.tests.conftest import bearer, tenant
from shared.db import plain_url

DECIDER = ("approvals:read", "approvals:decide", "approvals:request", "payments:read")


@pytest.fixture
async def browser(stack):
    """A cookie-keeping client, like a browser (it sends no Origin: same as a form post
    from a browser that omits it; the Origin check is tested on its own)."""
    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=15, follow_redirects=False) as http:
        yield http


def field(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no {name} field in the page"
    return match.group(1)


async def sign_in(http: httpx.AsyncClient, key: str) -> httpx.Response:
    page = await http.get("/console/sign-in")
    assert page.status_code == 200
    return await http.post("/console/sign-in", data={"csrf_token": field(page.text, "csrf_token"),
                                                     "next": "/console/approvals", "api_key": key})


async def signed_in(stack, http, *, t: str, principal: str, scopes=DECIDER) -> str:
    key = await stack.key(tenant=t, principal=principal, scopes=scopes)
    assert (await sign_in(http, key)).status_code == 303
    return key


async def pending_request(stack, client, key: str) -> str:
    """A pending generic approval request made by `key`'s principal (no amount: one approver)."""
    made = await client.post("/v1/approvals", headers={**bearer(key), "Idempotency-Key": uuid.uuid4().hex},
                             json={"subject_type": "payee", "subject_id": f"payee-{uuid.uuid4().hex[:8]}"})
    assert made.status_code == 201 and made.json()["status"] == "pending", made.text
    return made.json()["id"]


async def owner(stack) -> asyncpg.Connection:
    return await asyncpg.connect(plain_url(stack.gateway_db.owner_url))


async def test_sign_in_sets_a_strict_httponly_cookie_and_stores_only_its_hash(stack, browser):
    key = await stack.key(tenant=tenant(), principal="carol", scopes=DECIDER)
    signed = await sign_in(browser, key)
    assert signed.status_code == 303 and signed.headers["location"] == "/console/approvals"
    cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith("ch_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain http here; https or CONSOLE_COOKIE_SECURE adds it
    token = browser.cookies["ch_console"]
    assert key not in cookie and token not in key
    conn = await owner(stack)
    try:
        row = await conn.fetchrow("SELECT principal_id, ended_at FROM console_sessions WHERE token_hash = $1",
                                  hash_token(token))
        stored = await conn.fetchval("SELECT count(*) FROM console_sessions WHERE token_hash = $1", token.encode())
    finally:
        await conn.close()
    assert row["principal_id"] == "carol" and row["ended_at"] is None and stored == 0
    page = await browser.get("/console/approvals")
    assert page.status_code == 200 and "carol" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in page.headers["content-security-policy"]


async def test_cookies_are_secure_when_the_console_is_served_over_https(browser):
    # A TLS-terminating proxy on this host says so; uvicorn trusts it from 127.0.0.1.
    page = await browser.get("/console/sign-in", headers={"X-Forwarded-Proto": "https"})
    cookie = page.headers["set-cookie"]
    assert cookie.startswith("ch_console_sign_in=") and "Secure" in cookie and "HttpOnly" in cookie


async def test_a_wrong_or_missing_key_or_csrf_token_does_not_sign_in(stack, browser):
    key = await stack.key(tenant=tenant(), scopes=DECIDER)
    wrong = await sign_in(browser, key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB"))
    assert wrong.status_code == 401 and "was not accepted" in wrong.text and "ch_console" not in browser.cookies
    no_csrf = await browser.post("/console/sign-in", data={"api_key": key, "csrf_token": "forged"})
    assert no_csrf.status_code == 403 and "csrf_refused" in no_csrf.text
    fresh = httpx.AsyncClient(base_url=stack.gateway.url)  # no sign-in cookie at all
    async with fresh:
        cookieless = await fresh.post("/console/sign-in", data={"api_key": key, "csrf_token": "x"})
    assert cookieless.status_code == 403


async def test_pages_need_a_session_and_send_the_person_to_sign_in(browser):
    answer = await browser.get("/console/payments")
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/console/sign-in?next=/console/payments")
    poll = await browser.get("/console/approvals/rows", headers={"X-Console-Poll": "1"})
    assert poll.status_code == 401


async def test_every_form_post_needs_the_session_csrf_token_and_a_same_origin(stack, browser, client):
    t = tenant()
    maker = await stack.key(tenant=t, principal="maker", scopes=DECIDER)
    approval = await pending_request(stack, client, maker)
    await signed_in(stack, browser, t=t, principal="checker")
    page = await browser.get("/console/approvals")
    form = {"csrf_token": field(page.text, "csrf_token"), "idempotency_key": uuid.uuid4().hex,
            "decision": "approve", "reason": "ok"}
    for forged in ({**form, "csrf_token": "0" * 64}, {k: v for k, v in form.items() if k != "csrf_token"}):
        refused = await browser.post(f"/console/approvals/{approval}/decisions", data=forged)
        assert refused.status_code == 403 and "csrf_refused" in refused.text
    cross_site = await browser.post(f"/console/approvals/{approval}/decisions", data=form,
                                    headers={"Origin": "https://evil.example"})
    assert cross_site.status_code == 403
    as_json = await browser.post(f"/console/approvals/{approval}/decisions", json=form)
    assert as_json.status_code == 403
    still = await client.get(f"/v1/approvals/{approval}", headers=bearer(maker))
    assert still.json()["status"] == "pending" and still.json()["decisions"] == []


async def test_a_checker_decides_through_the_approvals_service_once_per_form(stack, browser, client):
    t = tenant()
    maker = await stack.key(tenant=t, principal="maker", scopes=DECIDER)
    approval = await pending_request(stack, client, maker)
    await signed_in(stack, browser, t=t, principal="checker")
    page = await browser.get("/console/approvals")
    row = page.text[page.text.index(f'id="approval-{approval}"'):]
    form = {"csrf_token": field(page.text, "csrf_token"), "idempotency_key": field(row, "idempotency_key"),
            "decision": "approve", "reason": "invoice checked"}
    decided = await browser.post(f"/console/approvals/{approval}/decisions", data=form)
    assert decided.status_code == 303 and "outcome=granted" in decided.headers["location"], decided.text
    again = await browser.post(f"/console/approvals/{approval}/decisions", data=form)  # a double submit
    assert again.status_code == 303
    found = (await client.get(f"/v1/approvals/{approval}", headers=bearer(maker))).json()
    assert found["status"] == "granted"
    assert [(d["principal"], d["reason"]) for d in found["decisions"]] == [("checker", "invoice checked")]
    granted = next(e for e in found["history"] if e["type"].startswith("approval.granted"))
    assert granted["actor"] == "user:checker"


async def test_the_maker_sees_their_request_blocked_and_the_service_refuses_it(stack, browser, client):
    t = tenant()
    maker = await signed_in(stack, browser, t=t, principal="maker")
    approval = await pending_request(stack, client, maker)
    page = await browser.get("/console/approvals")
    row = page.text[page.text.index(f'id="approval-{approval}"'):page.text.index("</tr>",
                                                                                 page.text.index(approval))]
    assert "You made this request" in row and 'value="approve" disabled' in row
    forced = await browser.post(f"/console/approvals/{approval}/decisions", data={
        "csrf_token": field(page.text, "csrf_token"), "idempotency_key": field(row, "idempotency_key"),
        "decision": "approve", "reason": "mine anyway"})
    assert forced.status_code == 403 and "maker_cannot_decide" in forced.text
    assert "Traceback" not in forced.text
    assert (await client.get(f"/v1/approvals/{approval}", headers=bearer(maker))).json()["status"] == "pending"


async def test_a_missing_scope_is_shown_and_refused(stack, browser, client):
    t = tenant()
    maker = await stack.key(tenant=t, principal="maker", scopes=DECIDER)
    approval = await pending_request(stack, client, maker)
    await signed_in(stack, browser, t=t, principal="viewer", scopes=("approvals:read",))
    page = await browser.get("/console/approvals")
    assert "does not have the approvals:decide scope" in page.text
    refused = await browser.post(f"/console/approvals/{approval}/decisions", data={
        "csrf_token": field(page.text, "csrf_token"), "idempotency_key": uuid.uuid4().hex,
        "decision": "approve", "reason": "ok"})
    assert refused.status_code == 403 and "insufficient_scope" in refused.text
    reconciliation = await browser.get("/console/reconciliation")
    assert reconciliation.status_code == 200 and "reconciliation:read" in reconciliation.text


async def test_sign_out_ends_the_session_for_good(stack, browser):
    await signed_in(stack, browser, t=tenant(), principal="dave")
    token = browser.cookies["ch_console"]
    page = await browser.get("/console/approvals")
    without_token = await browser.post("/console/sign-out", data={})
    assert without_token.status_code == 403
    out = await browser.post("/console/sign-out", data={"csrf_token": field(page.text, "csrf_token")})
    assert out.status_code == 303 and out.headers["location"] == "/console/sign-in?reason=signed_out"
    assert "ch_console" not in browser.cookies
    async with httpx.AsyncClient(base_url=stack.gateway.url, cookies={"ch_console": token}) as stolen:
        replayed = await stolen.get("/console/approvals")
    assert replayed.status_code == 303 and "reason=signed_out" in replayed.headers["location"]


async def test_revoking_the_key_ends_its_sessions_at_once(stack, browser):
    key = await signed_in(stack, browser, t=tenant(), principal="erin")
    assert (await browser.get("/console/approvals")).status_code == 200
    await revoke_key(stack.gateway_db.owner_url, key)
    conn = await owner(stack)
    try:
        reason = await conn.fetchval("SELECT ended_reason FROM console_sessions WHERE token_hash = $1",
                                     hash_token(browser.cookies["ch_console"]))
    finally:
        await conn.close()
    assert reason == "key_revoked"
    after = await browser.get("/console/approvals")
    assert after.status_code == 303 and "reason=key_revoked" in after.headers["location"]
    notice = await browser.get(after.headers["location"])
    assert "has been revoked" in notice.text
    again = await sign_in(browser, key)
    assert again.status_code == 401 and "revoked" in again.text


async def test_an_idle_or_expired_session_ends(stack, browser):
    await signed_in(stack, browser, t=tenant(), principal="frank")
    hashed = hash_token(browser.cookies["ch_console"])
    conn = await owner(stack)
    try:  # the owner role stands in for the clock: half an hour without a page
        await conn.execute("UPDATE console_sessions SET last_seen_at = clock_timestamp() - interval '31 minutes' "
                           "WHERE token_hash = $1", hashed)
    finally:
        await conn.close()
    idle = await browser.get("/console/approvals")
    assert idle.status_code == 303 and "reason=expired" in idle.headers["location"]


async def test_failures_are_pages_with_a_request_id_not_stack_traces(stack, browser):
    await signed_in(stack, browser, t=tenant(), principal="gina", scopes=("payments:read",))
    unknown = await browser.get(f"/console/payments/{uuid.uuid4()}")
    assert unknown.status_code == 404 and unknown.headers["content-type"].startswith("text/html")
    assert "No payment with this id" in unknown.text and unknown.headers["request-id"] in unknown.text
    nowhere = await browser.get("/console/no/such/page")
    assert nowhere.status_code == 404 and "no page at this address" in nowhere.text
    odd = await browser.get("/console/payments/" + "x" * 200)
    assert odd.status_code == 404 and "Traceback" not in odd.text
    bad_search = await browser.get("/console/payments", params={"id": "<script>"})
    assert bad_search.status_code == 422 and "<script>" not in bad_search.text


async def test_the_health_page_reads_every_service_metrics(stack, browser):
    await signed_in(stack, browser, t=tenant(), principal="oncall", scopes=("payments:read",))
    page = await browser.get("/console/health")
    assert page.status_code == 200, page.text
    for process in ("payments-api", "approvals-api", "ledger-api", "reconciliation-api"):
        assert f'data-process="{process}"' in page.text
    assert page.text.count(">up<") == 5 and 'data-service="gateway"' in page.text


async def test_console_requests_are_counted_by_route_template_not_by_id(stack, browser):
    await signed_in(stack, browser, t=tenant(), principal="hank", scopes=("payments:read",))
    await browser.get(f"/console/payments/{uuid.uuid4()}")
    exported = (await browser.get("/metrics")).text
    assert 'route="/console/payments/{payment_id}"' in exported
    assert not re.search(r'route="/console/payments/[0-9a-f-]{36}"', exported)


async def test_the_console_is_not_part_of_the_public_api_document(client):
    document = (await client.get("/openapi.json")).json()
    assert not [p for p in document["paths"] if p.startswith("/console")]
