"""What the hostile tests aim at: one tenant's real objects (accounts, a transaction, a
hold, a settled payment with a refund, a payment waiting for approval, a statement, a run
and its break), a valid request body for every operation of the public API that takes
one, and the text fields and query parameters of every operation, read from the
gateway's merged OpenAPI document so that a new route or field is covered without
editing these tests (`body_for` refuses an operation it has no body for).
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from tests.hostile.conftest import Api, iban

METHODS = ("get", "post", "put", "patch", "delete")
# Path parameters that name one tenant's object; `subject_type` names a policy every
# tenant has its own of, and `processor` a processor (public webhooks).
OBJECT_PARAMETERS = {"payment_id", "approval_id", "account_id", "hold_id", "transaction_id", "refund_id",
                     "break_id", "run_id", "statement_id"}


@dataclass
class World:
    ids: dict[str, str]  # path parameter name -> an object of the world's tenant
    key: str  # every scope, principal alice
    tenant: str

    def path(self, template: str) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: self.ids[m.group(1)], template)


@dataclass(frozen=True)
class Operation:
    method: str  # upper case
    template: str
    spec: dict

    @property
    def label(self) -> str:
        return f"{self.method} {self.template}"

    @property
    def parameters(self) -> set[str]:
        return set(re.findall(r"\{(\w+)\}", self.template))

    @property
    def json_body(self) -> bool:
        return "application/json" in ((self.spec.get("requestBody") or {}).get("content") or {})


def operations(document: dict, *, public_only: bool = True) -> list[Operation]:
    found = []
    for template, item in document["paths"].items():
        for method in METHODS:
            if method in item and not (public_only and template.startswith("/v1/payments/webhooks/")):
                found.append(Operation(method.upper(), template, item[method]))
    return found


def document(gateway: str) -> dict:
    doc = httpx.get(f"{gateway}/openapi.json", timeout=30).json()
    assert not doc["info"].get("x-clearhouse-unavailable"), doc["info"]  # every service merged
    return doc


def body_for(operation: Operation, ids: dict[str, str]) -> dict | None:
    """A valid body for the operation on the world's objects (None: it takes none)."""
    if not operation.json_body:
        return None
    key = operation.label
    bodies: dict[str, dict] = {
        "POST /v1/approvals": {"subject_type": "vendor_onboarding", "subject_id": f"v-{uuid.uuid4().hex[:8]}",
                               "amount": 5_000, "currency": "EUR", "metadata": {"team": "ops"}},
        "PUT /v1/approvals/policies/{subject_type}": {
            "rules": [{"name": "one_approver", "required_approvals": 1}], "reason": "hostile suite"},
        "POST /v1/approvals/{approval_id}/decisions": {"decision": "approve", "reason": "looks right"},
        "POST /v1/ledger/accounts": {"name": "savings", "currency": "EUR", "normal_balance": "credit"},
        "POST /v1/ledger/holds": {"debit_account_id": ids["account_id"], "credit_account_id": ids["funding_id"],
                                  "amount": 100, "description": "reserve"},
        "POST /v1/ledger/holds/{hold_id}/post": {"amount": 100},
        "POST /v1/ledger/holds/{hold_id}/void": {"reason": "not needed"},
        "POST /v1/ledger/transactions": {"entries": [
            {"account_id": ids["funding_id"], "direction": "debit", "amount": 100},
            {"account_id": ids["account_id"], "direction": "credit", "amount": 100}],
            "description": "top-up", "external_id": f"ext-{uuid.uuid4().hex[:8]}"},
        "POST /v1/ledger/transactions/bulk": {"transactions": [{"entries": [
            {"account_id": ids["funding_id"], "direction": "debit", "amount": 100},
            {"account_id": ids["account_id"], "direction": "credit", "amount": 100}], "description": "bulk"}]},
        "POST /v1/ledger/transactions/{transaction_id}/reverse": {"description": "mistake"},
        "POST /v1/payments": {"amount": 1_000, "currency": "EUR", "debit_account_id": ids["account_id"],
                              "payee": {"name": "Jane Doe", "iban": "DE89370400440532013000"},
                              "reference": "invoice 42"},
        "POST /v1/payments/{payment_id}/cancel": {"reason": "changed my mind"},
        "POST /v1/payments/{payment_id}/refunds": {"amount": 10, "reason": "partial refund"},
        "POST /v1/reconciliation/breaks/{break_id}/resolve": {"resolution": "accepted", "reason": "known"},
        "PUT /v1/reconciliation/rules": {"date_window_days": 2},
        "POST /v1/reconciliation/runs": {"statement_id": ids["statement_id"]},
    }
    assert key in bodies, f"no body for {key}: add one here so the hostile suite covers it"
    return copy.deepcopy(bodies[key])


def string_fields(document: dict, operation: Operation) -> list[tuple]:
    """JSON paths (tuples of keys and list indexes) of every text field of the operation's
    body, as the document declares them, within the body `body_for` builds."""
    schema = operation.spec["requestBody"]["content"]["application/json"]["schema"]
    found: list[tuple] = []

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = document["components"]["schemas"][node["$ref"].split("/")[-1]]
        for option in node.get("anyOf", ()):
            option = resolve(option)
            if option.get("type") != "null":
                return option
        return node

    def walk(node: dict, path: tuple, depth: int) -> None:
        node = resolve(node)
        if depth > 4:
            return
        if node.get("type") == "string" and "enum" not in node:
            found.append(path)
        for name, child in (node.get("properties") or {}).items():
            walk(child, (*path, name), depth + 1)
        if node.get("type") == "array" and "items" in node:
            walk(node["items"], (*path, 0), depth + 1)

    walk(schema, (), 0)
    return found


def with_value(body: dict, path: tuple, value: Any) -> dict:
    """A copy of body with the field at path set (missing containers are created)."""
    out = copy.deepcopy(body)
    node = out
    for step, following in zip(path, path[1:]):
        if isinstance(node, list):
            while len(node) <= step:
                node.append({})
            node = node[step]
            continue
        if step not in node or not isinstance(node[step], (dict, list)):
            node[step] = [] if isinstance(following, int) else {}
        node = node[step]
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(value)
        node[last] = value
    else:
        node[last] = value
    return out


def query_parameters(operation: Operation) -> list[str]:
    return [p["name"] for p in operation.spec.get("parameters", []) if p.get("in") == "query"]


async def build_world(api: Api, key: str, tenant: str) -> World:
    """One tenant's objects of every kind the public paths name."""
    customer = await api.account("world customer")
    funding = await api.account("world funding", "debit", allow_negative=True)
    funded = await api.created("/v1/ledger/transactions", {"entries": [
        {"account_id": funding, "direction": "debit", "amount": 10_000_000},
        {"account_id": customer, "direction": "credit", "amount": 10_000_000}]})
    hold = await api.created("/v1/ledger/holds", {"debit_account_id": customer, "credit_account_id": funding,
                                                  "amount": 500})
    paid = await api.pay(customer, 2_000, name="World Payee", iban_=iban("DE", "500105170000000042"))
    await api.until_status(paid["id"], "settled")
    refund = await api.created(f"/v1/payments/{paid['id']}/refunds", {"amount": 100, "reason": "world refund"})
    await _refund_posted(api)
    large = await api.pay(customer, 150_000, name="World Payee", iban_=iban("DE", "500105170000000042"))
    approval = await _pending_approval(api, large["id"])
    statement = await api.http.post("/v1/reconciliation/statements", content=(
        "value_date,amount,currency,reference,credit_debit\n"
        f"{time.strftime('%Y-%m-%d')},20.00,EUR,{paid['id']},DBIT\n"
        f"{time.strftime('%Y-%m-%d')},99.00,EUR,{uuid.uuid4()},DBIT\n").encode(),
        headers={"Content-Type": "text/csv", "Idempotency-Key": uuid.uuid4().hex})
    assert statement.status_code == 201, statement.text
    run = await api.created("/v1/reconciliation/runs", {"statement_id": statement.json()["id"]}, status=202)
    broken = await _first_break(api, run["id"])
    return World(key=key, tenant=tenant, ids={
        "account_id": customer, "funding_id": funding, "transaction_id": funded["id"], "hold_id": hold["id"],
        "payment_id": paid["id"], "refund_id": refund["id"], "large_payment_id": large["id"],
        "approval_id": approval, "statement_id": statement.json()["id"], "run_id": run["id"],
        "break_id": broken, "subject_type": "payment", "processor": "sandbox"})


async def _pending_approval(api: Api, payment_id: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        listed = (await api.get("/v1/approvals", status="pending", subject_type="payment")).json()["data"]
        found = next((a["id"] for a in listed if a["subject_id"] == payment_id), None)
        if found:
            return found
        assert time.monotonic() < deadline, f"no approval request for {payment_id}"
        await asyncio.sleep(0.3)


async def _first_break(api: Api, run_id: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        run = (await api.get(f"/v1/reconciliation/runs/{run_id}")).json()
        if run.get("status") == "completed":
            breaks = (await api.get("/v1/reconciliation/breaks", run_id=run_id)).json()["data"]
            assert breaks, run
            return breaks[0]["id"]
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.3)


async def _refund_posted(api: Api, timeout: float = 90) -> None:
    """Until the ledger has posted the refund: the world holds every kind of transaction."""
    deadline = time.monotonic() + timeout
    while True:
        listed = await api.get("/v1/ledger/transactions", limit=100)
        if listed.status_code == 200 and any(t["kind"] == "payment_refund" for t in listed.json()["data"]):
            return
        assert time.monotonic() < deadline, f"no refund posted: {listed.status_code} {listed.text[:300]}"
        await asyncio.sleep(0.3)
