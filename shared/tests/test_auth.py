"""Only a token the gateway signed, for this audience, still fresh, gets a request in."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime, timedelta, timezone
from typing import Annotated

import jwt
import pytest
from fastapi import Depends, FastAPI

from shared import context
from shared.auth import (
    AUDIENCE, ISSUER, InvalidInternalToken, Principal, PrincipalDep, generate_keypair, require_scope,
    sign_internal_token, verify_internal_token,
)
from shared.errors import install_problem_handlers
from shared.tests.kit_app import PRIVATE_PEM, PUBLIC_PEM, bearer, client

OTHER_PRIVATE_PEM, _ = generate_keypair()


def claims(**overrides) -> dict:
    now = datetime.now(timezone.utc)
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "tenant": "t1", "scopes": ["ledger:read"],
            "rid": "r1", "iat": now, "exp": now + timedelta(seconds=60), "jti": "j1"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(**overrides) -> str:
    """A token signed with the real key but with chosen (possibly wrong) claims."""
    return jwt.encode(claims(**overrides), PRIVATE_PEM, algorithm="EdDSA")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_signed_token_verifies_to_its_principal():
    token = sign_internal_token(PRIVATE_PEM, tenant_id="t1", principal="alice", scopes=["ledger:write", "ledger:read"],
                                request_id="req-1")
    found = verify_internal_token(PUBLIC_PEM, token)
    assert found == Principal(tenant_id="t1", principal="alice", scopes=frozenset({"ledger:read", "ledger:write"}),
                              request_id="req-1")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["iss"] == "clearhouse-gateway" and payload["aud"] == "clearhouse-internal"
    assert payload["exp"] - payload["iat"] == 60 and payload["jti"]


def test_keypair_is_pem_ed25519():
    private_pem, public_pem = generate_keypair()
    assert private_pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert public_pem.startswith("-----BEGIN PUBLIC KEY-----")


@pytest.mark.parametrize("token_factory", [
    pytest.param(lambda: sign_internal_token(OTHER_PRIVATE_PEM, tenant_id="t1", principal="alice", scopes=[],
                                             request_id="r"), id="forged-signature"),
    pytest.param(lambda: signed(exp=datetime.now(timezone.utc) - timedelta(seconds=30)), id="expired"),
    pytest.param(lambda: signed(aud="someone-else"), id="wrong-audience"),
    pytest.param(lambda: signed(iss="mallory"), id="wrong-issuer"),
    pytest.param(lambda: jwt.encode(claims(), key=None, algorithm="none"), id="alg-none"),
    pytest.param(lambda: signed(tenant=None), id="missing-tenant"),
    pytest.param(lambda: signed(scopes=None), id="missing-scopes"),
    pytest.param(lambda: signed(rid=None), id="missing-request-id"),
    pytest.param(lambda: signed(jti=None), id="missing-jti"),
    pytest.param(lambda: signed(scopes="ledger:read"), id="scopes-not-a-list"),
    pytest.param(lambda: signed(tenant=""), id="empty-tenant"),
    pytest.param(lambda: "not.a.jwt", id="garbage"),
])
def test_anything_wrong_is_an_invalid_internal_token(token_factory):
    with pytest.raises(InvalidInternalToken) as raised:
        verify_internal_token(PUBLIC_PEM, token_factory())
    assert raised.value.status == 401 and raised.value.code == "invalid_internal_token"


def test_tampered_claims_break_the_signature():
    header, payload, signature = sign_internal_token(
        PRIVATE_PEM, tenant_id="t1", principal="alice", scopes=["ledger:read"], request_id="r").split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["tenant"] = "t2"
    with pytest.raises(InvalidInternalToken):
        verify_internal_token(PUBLIC_PEM, ".".join([header, b64(json.dumps(forged).encode()), signature]))


def test_hmac_signed_with_the_public_key_is_refused():
    # The classic algorithm-confusion attack: HS256 keyed with the (public) verification key.
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(iat=1, exp=4102444800)).encode())
    signature = b64(hmac.new(PUBLIC_PEM.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest())
    with pytest.raises(InvalidInternalToken):
        verify_internal_token(PUBLIC_PEM, f"{header}.{payload}.{signature}")


# --- through FastAPI ---------------------------------------------------------------------


def make_app(public_key: str | None = PUBLIC_PEM) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    app.state.internal_token_public_key = public_key

    @app.get("/whoami")
    async def whoami(principal: PrincipalDep) -> dict:
        ctx = context.current()
        return {"tenant": principal.tenant_id, "ctx_tenant": ctx.tenant_id, "ctx_principal": ctx.principal,
                "ctx_actor": ctx.actor, "ctx_scopes": sorted(ctx.scopes)}

    @app.post("/entries")
    async def post_entry(principal: Annotated[Principal, Depends(require_scope("ledger:write"))]) -> dict:
        return {"ok": True}

    return app


async def test_a_valid_token_reaches_the_route_and_binds_the_context():
    async with client(make_app()) as http:
        response = await http.get("/whoami", headers=bearer(tenant="t1", principal="bob", scopes=["ledger:read"]))
    assert response.status_code == 200
    assert response.json() == {"tenant": "t1", "ctx_tenant": "t1", "ctx_principal": "bob", "ctx_actor": "user:bob",
                               "ctx_scopes": ["ledger:read"]}


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="no-token"),
    pytest.param({"X-Tenant-Id": "t1", "X-Principal": "alice"}, id="forged-tenant-headers"),
    pytest.param({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, id="not-bearer"),
    pytest.param({"Authorization": "Bearer "}, id="empty-bearer"),
    pytest.param({"Authorization": "Bearer " + sign_internal_token(
        OTHER_PRIVATE_PEM, tenant_id="t1", principal="a", scopes=[], request_id="r")}, id="foreign-key"),
])
async def test_without_a_valid_token_the_route_never_runs(headers):
    async with client(make_app()) as http:
        response = await http.get("/whoami", headers=headers)
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_internal_token"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_forged_tenant_header_does_not_change_the_tenant():
    async with client(make_app()) as http:
        response = await http.get("/whoami", headers={**bearer(tenant="t1"), "X-Tenant-Id": "t2"})
    assert response.json()["ctx_tenant"] == "t1"


async def test_a_missing_scope_is_a_403_naming_it():
    async with client(make_app()) as http:
        refused = await http.post("/entries", headers=bearer(scopes=["ledger:read"]))
        allowed = await http.post("/entries", headers=bearer(scopes=["ledger:read", "ledger:write"]))
    assert refused.status_code == 403
    body = refused.json()
    assert body["code"] == "insufficient_scope" and body["missing_scope"] == "ledger:write"
    assert "ledger:write" in body["detail"]
    assert allowed.status_code == 200


async def test_an_app_without_a_public_key_refuses_everyone():
    async with client(make_app(public_key=None)) as http:
        response = await http.get("/whoami", headers=bearer())
    assert response.status_code == 401
