"""The payments API against real PostgreSQL: the contract's shapes, strict validation,
tenancy, idempotency, listing and cancellation."""

from __future__ import annotations

import uuid

import pytest

from services.payments.tests.integration.harness import (
    IBAN, PAYEE_NAME, asgi_client, headers, payment_body, rows, scalar,
)


async def create(app, private_pem, *, tenant="t1", principal="alice", key=None, **overrides):
    async with asgi_client(app) as http:
        return await http.post("/v1/payments", json=payment_body(**overrides),
                               headers=headers(private_pem, tenant=tenant, principal=principal,
                                               idempotency_key=key))


async def test_create_answers_the_contract_with_masked_payee(app, private_pem):
    response = await create(app, private_pem, metadata={"order": "o-1"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "pending_approval"
    assert (body["amount"], body["currency"], body["reference"]) == (12_500, "EUR", "Invoice 42")
    assert body["failure_reason"] is None
    assert body["debit_account_id"] == "acct_customer_1"
    assert body["payee"] == {"name": "J*** Q D**", "iban": "DE89********3000"}
    assert body["metadata"] == {"order": "o-1"}
    assert response.headers["location"] == f"/v1/payments/{body['id']}"
    assert IBAN not in response.text and PAYEE_NAME not in response.text


async def test_get_one_and_another_tenants_payment_is_not_found(app, private_pem):
    created = (await create(app, private_pem, tenant="t1")).json()
    async with asgi_client(app) as http:
        mine = await http.get(f"/v1/payments/{created['id']}", headers=headers(private_pem, tenant="t1"))
        theirs = await http.get(f"/v1/payments/{created['id']}", headers=headers(private_pem, tenant="t2"))
        cancel = await http.post(f"/v1/payments/{created['id']}/cancel", headers=headers(private_pem, tenant="t2"))
        nonsense = await http.get("/v1/payments/not-a-uuid", headers=headers(private_pem))
    assert mine.status_code == 200 and mine.json() == created
    assert theirs.status_code == 404 and theirs.json()["code"] == "payment_not_found"
    assert cancel.status_code == 404
    assert nonsense.status_code == 404 and nonsense.headers["content-type"] == "application/problem+json"


async def test_created_event_carries_masked_payee_and_payment_id(app, private_pem, sessionmaker):
    created = (await create(app, private_pem, principal="maker-1")).json()
    found = await rows(sessionmaker, "SELECT type, payload, actor, tenant_id FROM events WHERE aggregate_id = :id",
                       id=created["id"])
    assert len(found) == 1
    event = found[0]
    assert event.type == "payment.created.v1" and event.actor == "user:maker-1" and event.tenant_id == "t1"
    assert event.payload["payment_id"] == created["id"]
    assert event.payload["payee"] == {"name": "J*** Q D**", "iban": "DE89********3000"}
    assert event.payload["created_by"] == "maker-1"
    assert event.payload["status"] == "pending_approval"


async def test_scopes_are_enforced(app, private_pem):
    async with asgi_client(app) as http:
        read_only = headers(private_pem, scopes=("payments:read",))
        refused = await http.post("/v1/payments", json=payment_body(), headers=read_only)
        listed = await http.get("/v1/payments", headers=read_only)
        no_token = await http.get("/v1/payments")
    assert refused.status_code == 403 and refused.json()["code"] == "insufficient_scope"
    assert listed.status_code == 200
    assert no_token.status_code == 401


@pytest.mark.parametrize("change, pointer", [
    ({"amount": 0}, "/body/amount"),
    ({"amount": "100"}, "/body/amount"),
    ({"amount": 12.5}, "/body/amount"),
    ({"amount": True}, "/body/amount"),
    ({"amount": 10**16}, "/body/amount"),
    ({"currency": "eur"}, "/body/currency"),
    ({"currency": "XAU"}, "/body/currency"),  # gold: no minor unit, not money we move
    ({"payee": {"name": "Jane", "iban": "DE89370400440532013001"}}, "/body/payee/iban"),  # check digits
    ({"payee": {"name": "Jane", "iban": "DE8937040044053201300"}}, "/body/payee/iban"),  # length for DE
    ({"payee": {"name": "Jane", "iban": "ZZ89370400440532013000"}}, "/body/payee/iban"),  # no such country
    ({"payee": {"name": "", "iban": IBAN}}, "/body/payee/name"),
    ({"payee": {"name": "Jane\x00Doe", "iban": IBAN}}, "/body/payee/name"),
    ({"payee": {"name": "Jane", "iban": IBAN, "bic": "X"}}, "/body/payee/bic"),
    ({"reference": "x" * 141}, "/body/reference"),
    ({"reference": "line\nbreak"}, "/body/reference"),
    ({"debit_account_id": "../etc"}, "/body/debit_account_id"),
    ({"metadata": {f"k{i}": "v" for i in range(21)}}, "/body/metadata"),
    ({"metadata": {"k": 1}}, "/body/metadata/k"),
    ({"unexpected": 1}, "/body/unexpected"),
])
async def test_invalid_requests_are_refused_with_field_pointers(app, private_pem, change, pointer):
    async with asgi_client(app) as http:
        response = await http.post("/v1/payments", json=payment_body(**change), headers=headers(private_pem))
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "validation_error"
    assert any(e["pointer"].startswith(pointer) for e in problem["errors"]), problem["errors"]
    assert IBAN[:-1] not in response.text  # the offending value is never echoed


async def test_iban_in_groups_is_normalised(app, private_pem, sessionmaker):
    response = await create(app, private_pem, payee={"name": "Jane Doe", "iban": "de89 3704 0044 0532 0130 00"})
    assert response.status_code == 201
    assert response.json()["payee"]["iban"] == "DE89********3000"


async def test_odd_bodies_never_answer_500(app, private_pem):
    bodies = [b"", b"null", b"[]", b"{", b"\xff\xfe", b'{"amount": 1e400}', b'"x"', b'{"payee": []}',
              b'{"amount": 100, "currency": "EUR", "debit_account_id": "a", "reference": "\\ud800", '
              b'"payee": {"name": "x", "iban": "DE89370400440532013000"}}',
              b'{"amount": 99999999999999999999999999999999}']
    async with asgi_client(app) as http:
        for body in bodies:
            response = await http.post("/v1/payments", content=body,
                                       headers={**headers(private_pem), "Content-Type": "application/json"})
            assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
            assert response.headers["content-type"] == "application/problem+json"


async def test_idempotency_key_replays_the_first_answer(app, private_pem, sessionmaker):
    key = f"create-{uuid.uuid4()}"
    first = await create(app, private_pem, key=key)
    again = await create(app, private_pem, key=key)
    other = await create(app, private_pem, key=key, amount=999)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert await scalar(sessionmaker, "SELECT count(*) FROM payments WHERE id = :id", id=first.json()["id"]) == 1


async def test_list_filters_and_paginates_without_gaps_or_repeats(app, private_pem):
    tenant = f"lister-{uuid.uuid4().hex[:6]}"
    made = [(await create(app, private_pem, tenant=tenant, amount=100 + i)).json() for i in range(7)]
    seen, cursor = [], None
    async with asgi_client(app) as http:
        while True:
            params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = (await http.get("/v1/payments", params=params, headers=headers(private_pem, tenant=tenant))).json()
            seen += page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        by_status = await http.get("/v1/payments", params={"status": "cancelled"},
                                   headers=headers(private_pem, tenant=tenant))
        since = await http.get("/v1/payments", params={"created_gte": made[3]["created_at"]},
                               headers=headers(private_pem, tenant=tenant))
        before = await http.get("/v1/payments", params={"created_lt": made[3]["created_at"]},
                                headers=headers(private_pem, tenant=tenant))
        bad = [await http.get("/v1/payments", params=p, headers=headers(private_pem, tenant=tenant))
               for p in ({"limit": 0}, {"limit": 101}, {"status": "lost"}, {"cursor": "garbage!"},
                         {"created_gte": "yesterday"}, {"created_gte": "2024-01-01T00:00:00"},
                         {"created_lt": "9999-12-31T23:59:59-14:00"})]
    assert [p["id"] for p in seen] == [p["id"] for p in reversed(made)]  # newest first, each once
    assert all(p["payee"]["iban"] == "DE89********3000" for p in seen)
    assert by_status.json() == {"data": [], "next_cursor": None}
    assert [p["id"] for p in since.json()["data"]] == [p["id"] for p in reversed(made[3:])]
    assert [p["id"] for p in before.json()["data"]] == [p["id"] for p in reversed(made[:3])]
    assert [r.status_code for r in bad] == [422, 422, 422, 400, 422, 422, 422]
    assert bad[3].json()["code"] == "invalid_cursor"


async def test_cancel_pending_payment_then_cancel_again_is_a_conflict(app, private_pem, sessionmaker):
    created = (await create(app, private_pem)).json()
    async with asgi_client(app) as http:
        url = f"/v1/payments/{created['id']}/cancel"
        first = await http.post(url, json={"reason": "duplicate order"}, headers=headers(private_pem))
        second = await http.post(url, headers=headers(private_pem))
        history = await http.get(f"/v1/payments/{created['id']}/history", headers=headers(private_pem))
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    assert first.json()["cancellation_reason"] == "duplicate order"
    assert second.status_code == 409 and second.json()["code"] == "payment_not_cancellable"
    assert second.json()["payment_status"] == "cancelled"
    changes = history.json()["data"]
    assert [(c["type"], c["status"], c["actor"]) for c in changes] == [
        ("payment.created.v1", "pending_approval", "user:alice"),
        ("payment.cancelled.v1", "cancelled", "user:alice")]
    assert changes[1]["reason"] == "duplicate order"
    payload = (await rows(sessionmaker, "SELECT payload FROM events WHERE aggregate_id = :id "
                                        "AND type = 'payment.cancelled.v1'", id=created["id"]))[0].payload
    assert {"payment_id", "amount", "currency", "debit_account_id", "reason"} <= payload.keys()


async def test_refund_of_an_unsettled_payment_is_refused(app, private_pem):
    created = (await create(app, private_pem)).json()
    async with asgi_client(app) as http:
        response = await http.post(f"/v1/payments/{created['id']}/refunds", json={"amount": 10},
                                   headers=headers(private_pem))
    assert response.status_code == 409 and response.json()["code"] == "payment_not_refundable"
