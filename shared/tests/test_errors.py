"""Every failure answers RFC 9457 problem+json with a stable code and no leaked internals."""

from __future__ import annotations

import logging
import re

import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from pydantic import BaseModel

from shared import context
from shared.errors import (
    PROBLEM_MEDIA_TYPE, Conflict, DomainError, NotFound, ValidationFailed, install_problem_handlers,
    json_pointer, problem_body, problem_responses,
)
from shared.tests.kit_app import client


class AccountFrozen(Conflict):
    code = "account_frozen"
    title = "Account frozen"


class Entry(BaseModel):
    account_id: str
    amount: int


class TransactionCreate(BaseModel):
    entries: list[Entry]


def make_app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/transactions", responses=problem_responses(AccountFrozen, NotFound, 422))
    async def post_transaction(body: TransactionCreate) -> dict:
        return {"entries": len(body.entries)}

    @app.get("/accounts/{account_id}")
    async def get_account(account_id: str) -> dict:
        if account_id == "frozen":
            raise AccountFrozen("Account acc_1 is frozen.", account_id="acc_1")
        raise NotFound(f"No account {account_id}.")

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("password=hunter2 SELECT * FROM payees")

    return app


def assert_problem(response, *, status: int, code: str) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body = response.json()
    assert body["status"] == status and body["code"] == code
    assert body["type"] == f"https://clearhouse.dev/problems/{code}"
    assert body["title"] and body["detail"] and body["trace_id"]
    return body


async def test_domain_error_carries_its_status_code_and_extra_members():
    async with client(make_app()) as http:
        body = assert_problem(await http.get("/accounts/frozen"), status=409, code="account_frozen")
        assert body["title"] == "Account frozen"
        assert body["detail"] == "Account acc_1 is frozen."
        assert body["account_id"] == "acc_1"
        assert "errors" not in body
        assert_problem(await http.get("/accounts/nope"), status=404, code="not_found")


def test_extra_members_cannot_overwrite_the_standard_ones():
    with pytest.raises(ValueError):
        DomainError("x", status=200)


async def test_validation_errors_point_at_the_field_and_never_echo_the_input():
    secret = "DE89370400440532013000"
    async with client(make_app()) as http:
        response = await http.post("/transactions", json={"entries": [{"account_id": "a", "amount": secret}, {}]})
    body = assert_problem(response, status=422, code="validation_error")
    pointers = {(e["pointer"], e["code"]) for e in body["errors"]}
    assert ("/body/entries/0/amount", "int_parsing") in pointers
    assert ("/body/entries/1/account_id", "missing") in pointers
    assert all(e["detail"] for e in body["errors"])
    assert secret not in response.text


async def test_unparseable_json_is_a_400_not_a_validation_error():
    async with client(make_app()) as http:
        response = await http.post("/transactions", content=b'{"entries": [',
                                   headers={"content-type": "application/json"})
    assert_problem(response, status=400, code="malformed_json")


async def test_framework_http_errors_become_problems():
    async with client(make_app()) as http:
        assert_problem(await http.get("/no/such/route"), status=404, code="not_found")
        response = await http.delete("/transactions")
    assert_problem(response, status=405, code="method_not_allowed")
    assert "POST" in response.headers["allow"]


async def test_unexpected_exception_is_a_generic_500_logged_with_its_traceback(caplog):
    caplog.set_level(logging.ERROR, logger="shared.errors")
    # Starlette's last-resort handler answers, then re-raises for the server to see.
    async with client(make_app(), raise_app_exceptions=False) as http:
        response = await http.get("/boom")
    body = assert_problem(response, status=500, code="internal_error")
    assert "hunter2" not in response.text and "SELECT" not in response.text
    record = next(r for r in caplog.records if r.name == "shared.errors")
    assert record.exc_info and "hunter2" in str(record.exc_info[1])
    assert body["trace_id"] in record.getMessage()


def test_trace_id_is_the_active_span_else_the_request_id():
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        body = problem_body(404, code="not_found", detail="x")
    assert body["trace_id"] == f"{span.get_span_context().trace_id:032x}"

    token = context.bind(request_id="req-123")
    try:
        assert problem_body(404, code="not_found", detail="x")["trace_id"] == "req-123"
    finally:
        context.reset(token)
    assert re.fullmatch(r"[0-9a-f]{32}", problem_body(404, code="not_found", detail="x")["trace_id"])


def test_json_pointer_escapes_per_rfc_6901():
    assert json_pointer(("body", "entries", 0, "amount")) == "/body/entries/0/amount"
    assert json_pointer(("body", "a/b", "c~d")) == "/body/a~1b/c~0d"


def test_field_errors_pass_through_a_domain_validation_error():
    error = ValidationFailed("Unbalanced.", errors=[{"pointer": "/body/entries", "detail": "debits != credits",
                                                    "code": "unbalanced"}])
    assert error.status == 422 and error.code == "validation_error" and error.errors[0]["code"] == "unbalanced"


def test_openapi_documents_problem_responses():
    schema = make_app().openapi()
    responses = schema["paths"]["/transactions"]["post"]["responses"]
    assert set(responses) >= {"404", "409", "422"}
    assert "account_frozen" in responses["409"]["description"]
    assert responses["409"]["content"][PROBLEM_MEDIA_TYPE]["schema"] == {"$ref": "#/components/schemas/Problem"}
    problem = schema["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "code", "trace_id"}
