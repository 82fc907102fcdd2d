"""Forged credentials past the gateway and forged news from the processor.

Internal tokens: a caller who reaches a service directly (its port, not the gateway's)
gets nothing with a tenant header, the partner's API key, a token signed by another key,
an expired one, one for another audience or issuer, an unsigned or HMAC one, or a real
token whose tenant claim was edited: every one is 401. A real token of tenant B cannot
read tenant A's objects (404).

Webhooks: a payment held at `submitted` (reference NOWEBHOOK: the sandbox sends no news)
is settled only by a correctly signed, fresh webhook; unsigned, wrongly signed, stale,
tampered and replayed ones change nothing, and a replay of the real one is deduplicated.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from shared.auth import ALGORITHM, AUDIENCE, ISSUER, generate_keypair, sign_internal_token
from shared.testing import eventually
from tests.hostile.conftest import assert_problem, sign_webhook

# One tenant-scoped read per service, each naming an object of tenant A.
DIRECT_READS = {"payments": "/v1/payments/{payment_id}", "approvals": "/v1/approvals/{approval_id}",
                "ledger": "/v1/ledger/accounts/{account_id}", "reconciliation": "/v1/reconciliation/runs/{run_id}"}
DIRECT_WRITES = {"payments": "/v1/payments", "approvals": "/v1/approvals", "ledger": "/v1/ledger/accounts",
                 "reconciliation": "/v1/reconciliation/runs"}
SCOPES = ["payments:read", "approvals:read", "ledger:read", "reconciliation:read"]


def _claims(tenant: str, **override) -> dict:
    now = datetime.now(timezone.utc)
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "tenant": tenant, "scopes": SCOPES, "rid": "r1",
              "iat": now, "exp": now + timedelta(seconds=60), "jti": uuid.uuid4().hex}
    claims.update(override)
    return claims


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, default=str).encode()).rstrip(b"=").decode()


def forgeries(private_pem: str, public_pem: str, tenant: str, api_key: str) -> dict[str, dict[str, str]]:
    real = jwt.encode(_claims(tenant), private_pem_key(private_pem), algorithm=ALGORITHM)
    header, _, signature = real.split(".")
    edited = f"{header}.{_b64({**_claims('someone-else'), 'iat': int(time.time()), 'exp': int(time.time()) + 60})}" \
             f".{signature}"
    rogue_private, _ = generate_keypair()
    past = datetime.now(timezone.utc) - timedelta(minutes=10)

    def signed(**override) -> dict[str, str]:
        return {"Authorization": "Bearer " + jwt.encode(_claims(tenant, **override), private_pem_key(private_pem),
                                                        algorithm=ALGORITHM)}

    return {
        "no token, tenant headers": {"X-Tenant-Id": tenant, "X-Principal": "alice", "X-Scopes": " ".join(SCOPES)},
        "the partner's API key": {"Authorization": f"Bearer {api_key}"},
        "another signing key": {"Authorization": "Bearer " + sign_internal_token(
            rogue_private, tenant_id=tenant, principal="alice", scopes=SCOPES, request_id="r")},
        "expired": signed(iat=past, exp=past + timedelta(seconds=60)),
        "another audience": signed(aud="clearhouse-public"),
        "another issuer": signed(iss="someone"),
        "no tenant claim": {"Authorization": "Bearer " + jwt.encode(
            {k: v for k, v in _claims(tenant).items() if k != "tenant"}, private_pem_key(private_pem),
            algorithm=ALGORITHM)},
        "tenant claim edited": {"Authorization": f"Bearer {edited}"},
        "alg none": {"Authorization": "Bearer " + f"{_b64({'alg': 'none', 'typ': 'JWT'})}."
                                                  f"{_b64({**_claims(tenant), 'iat': 1, 'exp': 4102444800})}."},
        "HS256 with the public key": {"Authorization": "Bearer " + _hs256(public_pem, tenant)},
    }


def private_pem_key(private_pem: str):
    return serialization.load_pem_private_key(private_pem.encode(), password=None)


def _hs256(public_pem: str, tenant: str) -> str:
    header = _b64({"alg": "HS256", "typ": "JWT"})
    payload = _b64({**_claims(tenant), "iat": int(time.time()), "exp": int(time.time()) + 60})
    digest = hmac.new(public_pem.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"


async def test_services_refuse_every_forged_internal_token(hostile, world):
    public_pem = (hostile.home / "keys" / "internal-token.pub.pem").read_text()
    cases = forgeries(hostile.private_pem, public_pem, world.tenant, world.key)
    failures = []
    async with httpx.AsyncClient(timeout=30) as http:
        for service, template in DIRECT_READS.items():
            url = hostile.service(service) + world.path(template)
            genuine = await http.get(url, headers={"Authorization": "Bearer " + sign_internal_token(
                hostile.private_pem, tenant_id=world.tenant, principal="alice", scopes=SCOPES, request_id="r")})
            assert genuine.status_code == 200, (service, genuine.text)  # the control: the forgeries are what fail
            for name, headers in cases.items():
                response = await http.get(url, headers=headers)
                if response.status_code != 401 or response.json().get("code") != "invalid_internal_token":
                    failures.append(f"{service} [{name}]: {response.status_code} {response.text[:160]}")
            # Writes too: the same door.
            write = await http.post(hostile.service(service) + DIRECT_WRITES[service], json={},
                                    headers=cases["no token, tenant headers"])
            if write.status_code != 401:
                failures.append(f"{service} [write with tenant headers]: {write.status_code}")
    assert not failures, "\n".join(failures)


async def test_a_genuine_token_of_another_tenant_finds_nothing_of_a(hostile, world):
    token = sign_internal_token(hostile.private_pem, tenant_id="t-somebody-else", principal="eve", scopes=SCOPES,
                                request_id="r")
    async with httpx.AsyncClient(timeout=30) as http:
        for service, template in DIRECT_READS.items():
            response = await http.get(hostile.service(service) + world.path(template),
                                      headers={"Authorization": f"Bearer {token}"})
            assert_problem(response, 404)


# --- processor webhooks -----------------------------------------------------------------------------


@pytest.fixture
async def submitted(hostile):
    """(payment id, attempt id, payout id) of a payment the sandbox accepted and will never
    send news about."""
    api = hostile.api(await hostile.key())
    payment = await api.pay(await api.funded_account(), 1_000, reference=f"NOWEBHOOK {uuid.uuid4().hex[:6]}")
    await api.until_status(payment["id"], "submitted")
    conn = await asyncpg.connect(hostile.database_url("payments"))
    try:
        async def attempt():
            return await conn.fetchrow("SELECT id, processor_object_id FROM processor_attempts "
                                       "WHERE payment_id = $1 AND processor_object_id IS NOT NULL",
                                       uuid.UUID(payment["id"]))
        row = await eventually(attempt, timeout=60)
    finally:
        await conn.close()
    yield api, payment["id"], str(row["id"]), row["processor_object_id"]
    await api.close()


def payout_settled(attempt_id: str, payout_id: str, event_id: str) -> bytes:
    return orjson.dumps({"id": event_id, "object": "event", "type": "payout.settled", "created": int(time.time()),
                         "data": {"object": {"id": payout_id, "object": "payout", "request_id": attempt_id,
                                             "status": "settled", "amount": 1_000, "currency": "EUR",
                                             "value_date": time.strftime("%Y-%m-%d"), "failure_code": None}}})


async def _settled_events(hostile, payment_id: str) -> int:
    conn = await asyncpg.connect(hostile.database_url("payments"))
    try:
        return await conn.fetchval("SELECT count(*) FROM events WHERE aggregate_id = $1 "
                                   "AND type = 'payment.settled.v1'", payment_id)
    finally:
        await conn.close()


async def test_forged_webhooks_are_401_and_a_replayed_one_is_applied_once(hostile, submitted):
    api, payment_id, attempt_id, payout_id = submitted
    secret, url = hostile.webhook_secret, f"{hostile.gateway}/v1/payments/webhooks/sandbox"
    body = payout_settled(attempt_id, payout_id, f"evt_{uuid.uuid4().hex}")
    other = payout_settled(attempt_id, payout_id, f"evt_{uuid.uuid4().hex}")
    stale = int(time.time()) - 301
    forged = {
        "unsigned": (body, {"Content-Type": "application/json"}),
        "another secret": (body, sign_webhook(b"not-the-processors-secret", body)),
        "stale timestamp": (body, sign_webhook(secret, body, timestamp=stale)),
        "future timestamp": (body, sign_webhook(secret, body, timestamp=int(time.time()) + 3600)),
        "signature of another body": (body, sign_webhook(secret, other)),
        "tampered after signing": (body.replace(b'"settled"', b'"failed"', 1), sign_webhook(secret, body)),
        "garbage signature": (body, {"Content-Type": "application/json", "Clearhouse-Signature": "t=1,v1=zz"}),
    }
    async with httpx.AsyncClient(timeout=30) as http:
        for name, (content, headers) in forged.items():
            response = await http.post(url, content=content, headers=headers)
            assert_problem(response, 401, "invalid_webhook_signature")
        assert (await api.get(f"/v1/payments/{payment_id}")).json()["status"] == "submitted"

        genuine = sign_webhook(secret, body)
        first = await http.post(url, content=body, headers=genuine)
        assert first.status_code == 200, first.text
        for _ in range(3):  # the processor retries, or an attacker replays what they captured
            again = await http.post(url, content=body, headers=genuine)
            assert again.status_code == 200, again.text
    assert (await api.until_status(payment_id, "settled"))["status"] == "settled"
    assert await _settled_events(hostile, payment_id) == 1
