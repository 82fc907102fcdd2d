"""Who gets through the door: keys verified, revoked at once, scopes checked, rates
limited, and the services behind it refusing anything the gateway did not sign."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest

from clearhouse.embedded import free_port
from gateway.keys import create_key, ensure_demo_key, list_keys, revoke_key
from gateway.tests.conftest import assert_problem, bearer, tenant
from shared.auth import generate_keypair, sign_internal_token
from shared.db import plain_url
from shared.tests.conftest import eventually


async def test_a_valid_key_reaches_the_service_as_its_tenant(stack, client):
    t = tenant()
    key = await stack.key(tenant=t, scopes=["approvals:read"])
    response = await client.get("/v1/approvals", headers=bearer(key))
    assert response.status_code == 200, response.text
    assert response.json()["data"] == []
    assert response.headers["ratelimit-limit"] and response.headers["request-id"]


async def test_missing_malformed_unknown_and_wrong_secret_keys_are_401(stack, client):
    key = await stack.key(tenant=tenant(), scopes=["approvals:read"])
    missing = await client.get("/v1/approvals")
    assert_problem(missing, 401, "missing_api_key")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert_problem(await client.get("/v1/approvals", headers={"Authorization": f"Basic {key}"}), 401,
                   "invalid_api_key")
    assert_problem(await client.get("/v1/approvals", headers=bearer("ch_live_nope")), 401, "invalid_api_key")
    unknown = key[:8] + "0123456789abcdef" + key[24:]
    assert_problem(await client.get("/v1/approvals", headers=bearer(unknown)), 401, "invalid_api_key")
    wrong_secret = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    body = assert_problem(await client.get("/v1/approvals", headers=bearer(wrong_secret)), 401, "invalid_api_key")
    assert key[25:] not in str(body)


async def test_a_key_of_the_other_environment_is_refused(stack, client):
    key = await stack.key(tenant=tenant(), scopes=["approvals:read"], environment="test")
    assert key.startswith("ch_test_")
    body = assert_problem(await client.get("/v1/approvals", headers=bearer(key)), 401, "invalid_api_key")
    assert "test key" in body["detail"]


async def test_revocation_takes_effect_at_once(stack, client):
    key = await stack.key(tenant=tenant(), scopes=["approvals:read"])
    for _ in range(3):  # cached now
        assert (await client.get("/v1/approvals", headers=bearer(key))).status_code == 200
    info = await revoke_key(stack.gateway_db.owner_url, key)
    assert info.revoked_at is not None
    refused = await first_refusal(client, key, "/v1/approvals")
    assert_problem(refused, 401, "api_key_revoked")


async def first_refusal(client: httpx.AsyncClient, key: str, path: str) -> httpx.Response:
    """The first refused answer after a change committed. The change reaches each gateway
    as a NOTIFY, asynchronously, so a request sent in the same millisecond may still pass;
    the bound asserted is far below the cache's 5 s backstop, so it is the notification,
    not the expiry, that took the key away."""
    started = time.monotonic()
    while True:
        response = await client.get(path, headers=bearer(key))
        if response.status_code != 200:
            assert time.monotonic() - started < 0.5, "the change took effect only by cache expiry"
            return response
        assert time.monotonic() - started < 0.5, "the gateway still accepts the key"
        await asyncio.sleep(0.005)


async def test_missing_scope_is_403_naming_it(stack, client):
    key = await stack.key(tenant=tenant(), scopes=["approvals:read"])
    response = await client.post("/v1/approvals/5b0c1c8e-3f8a-4b7e-9a51-2d5f3c9e4a10/decisions", headers=bearer(key),
                                 json={"decision": "approve", "reason": "ok"})
    body = assert_problem(response, 403, "insufficient_scope")
    assert body["missing_scope"] == "approvals:decide" and "approvals:decide" in body["detail"]
    body = assert_problem(await client.get("/v1/ledger/accounts/a/balance", headers=bearer(key)), 403,
                          "insufficient_scope")
    assert body["missing_scope"] == "ledger:read"


async def test_narrowing_a_principals_scopes_narrows_its_keys_at_once(stack, client):
    t = tenant()
    key = await stack.key(tenant=t, principal="bob", scopes=["approvals:read", "ledger:read"])
    assert (await client.get("/v1/approvals", headers=bearer(key))).status_code == 200
    conn = await asyncpg.connect(plain_url(stack.gateway_db.owner_url))
    try:
        await conn.execute("UPDATE principals SET scopes = '{ledger:read}' WHERE tenant_id = $1 AND id = 'bob'", t)
    finally:
        await conn.close()
    assert_problem(await first_refusal(client, key, "/v1/approvals"), 403, "insufficient_scope")


async def test_rate_limit_answers_429_with_headers_then_recovers(stack):
    key = await stack.key(tenant=tenant(), scopes=["approvals:read"])
    async with stack.another_gateway(rate_limit_burst=3, rate_limit_per_s=5.0) as gw, \
            httpx.AsyncClient(base_url=gw.url) as http:
        answers = [await http.get("/v1/approvals", headers=bearer(key)) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert [a.headers["ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
        refused = answers[-1]
        assert_problem(refused, 429, "rate_limited")
        assert refused.headers["retry-after"] == "1" and refused.headers["ratelimit-limit"] == "3"
        assert int(refused.headers["ratelimit-reset"]) >= 1
        await asyncio.sleep(float(refused.headers["retry-after"]))
        assert (await http.get("/v1/approvals", headers=bearer(key))).status_code == 200


async def test_an_unreachable_key_database_is_a_503_not_a_500(stack):
    key = await stack.key(tenant=tenant(), scopes=["approvals:read"])
    nowhere = f"postgresql://nobody@127.0.0.1:{free_port()}/gateway"
    async with stack.another_gateway(database_url=nowhere) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        body = assert_problem(await http.get("/v1/approvals", headers=bearer(key)), 503, "auth_unavailable")
        assert "retry" in body["detail"]
        assert_problem(await http.get("/readyz"), 503, "not_ready")
        assert (await http.get("/healthz")).status_code == 200


async def test_services_refuse_requests_the_gateway_did_not_sign(stack, client):
    """Straight to the approvals service, past the gateway: a forged tenant header, the
    caller's API key, or a token signed with another key all get nothing."""
    t = tenant()
    key = await stack.key(tenant=t, scopes=["approvals:read", "approvals:request"])
    direct = stack.services["approvals"].url
    async with httpx.AsyncClient(base_url=direct) as http:
        forged = await http.get("/v1/approvals", headers={"X-Tenant-Id": t, "X-Principal": "alice"})
        assert_problem(forged, 401, "invalid_internal_token")
        assert_problem(await http.get("/v1/approvals", headers=bearer(key)), 401, "invalid_internal_token")
        rogue_private, _ = generate_keypair()
        rogue = sign_internal_token(rogue_private, tenant_id=t, principal="alice", scopes=["approvals:read"],
                                    request_id="r")
        assert_problem(await http.get("/v1/approvals", headers=bearer(rogue)), 401, "invalid_internal_token")
    assert (await client.get("/v1/approvals", headers=bearer(key))).status_code == 200


async def test_key_administration_creates_lists_and_revokes(stack):
    t = tenant()
    url = stack.gateway_db.owner_url
    first = await create_key(url, tenant=t, principal="carol", scopes=["ledger:read", "ledger:write"])
    second = await create_key(url, tenant=t, principal="carol", scopes=["ledger:read"], name="reporting")
    with pytest.raises(ValueError, match="does not hold payments:write"):
        await create_key(url, tenant=t, principal="carol", scopes=["payments:write"])
    with pytest.raises(ValueError, match="not valid"):
        await create_key(url, tenant="bad tenant", principal="carol", scopes=["ledger:read"])
    listed = await list_keys(url, tenant=t)
    assert [k.scopes for k in listed] == [["ledger:read", "ledger:write"], ["ledger:read"]]
    assert all(first not in str(k.as_json()) and k.prefix.startswith("ch_live_") for k in listed)
    await revoke_key(url, second)
    assert [k.name for k in await list_keys(url, tenant=t)] == [None]
    assert len(await list_keys(url, tenant=t, include_revoked=True)) == 2
    with pytest.raises(ValueError, match="no API key"):
        await revoke_key(url, "0123456789abcdef")


async def test_last_use_is_stamped_lazily(stack, client):
    t = tenant()
    key = await stack.key(tenant=t, scopes=["approvals:read"])
    assert (await list_keys(stack.gateway_db.owner_url, tenant=t))[0].last_used_at is None
    for _ in range(3):
        assert (await client.get("/v1/approvals", headers=bearer(key))).status_code == 200

    async def stamped():
        return (await list_keys(stack.gateway_db.owner_url, tenant=t))[0].last_used_at

    first = await eventually(stamped, timeout=5)
    assert (await client.get("/v1/approvals", headers=bearer(key))).status_code == 200
    await asyncio.sleep(0.2)
    assert await stamped() == first  # once per resolution (a minute), not per request


async def test_the_demo_key_is_kept_while_it_works_and_replaced_once_revoked(stack, tmp_path):
    url, path = stack.gateway_db.owner_url, tmp_path / "keys" / "demo-api-key"
    first = await ensure_demo_key(url, path, tenant=tenant())
    assert first.startswith("ch_live_") and oct(path.stat().st_mode & 0o777) == "0o600"
    assert await ensure_demo_key(url, path) == first
    await revoke_key(url, first)
    second = await ensure_demo_key(url, path)
    assert second != first and path.read_text().strip() == second


async def test_the_database_keeps_revocation_final_and_the_runtime_role_read_only(stack):
    t = tenant()
    key = await stack.key(tenant=t, scopes=["ledger:read"])
    await revoke_key(stack.gateway_db.owner_url, key)
    key_id = key.split("_")[2]
    owner = await asyncpg.connect(plain_url(stack.gateway_db.owner_url))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="stays revoked"):
            await owner.execute("UPDATE api_keys SET revoked_at = NULL WHERE id = $1", key_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="never deleted"):
            await owner.execute("DELETE FROM api_keys WHERE id = $1", key_id)
    finally:
        await owner.close()
    runtime = await asyncpg.connect(plain_url(stack.gateway_db.app_url))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await runtime.execute("INSERT INTO tenants (id) VALUES ('intruder')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await runtime.execute("UPDATE api_keys SET scopes = '{ledger:write}' WHERE id = $1", key_id)
    finally:
        await runtime.close()
