"""The money flow of the design, end to end, on the platform `clearhouse up` starts: every
call goes through the gateway with an API key, every hop between services is a real
Kafka event, and `clearhouse verify` finds every invariant intact afterwards.

    partner ─▶ gateway ─▶ payments ─▶ approvals ─▶ payments ─▶ ledger (hold) ─▶ payments
            ─▶ sandbox processor ─▶ webhook ─▶ payments (settled) ─▶ ledger (hold posted)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tests.running import ROOT, Up

CUSTOMER_IBAN = "DE89370400440532013000"


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    home = tmp_path_factory.mktemp("flow") / "home"
    up = Up(home)
    lines = up.wait_for(r"Ctrl-C stops everything", timeout=180)
    gateway = next(m.group(1) for line in lines if (m := re.search(r"gateway URL\s+(http://\S+)", line)))
    key = next(m.group(1) for line in lines if (m := re.search(r"demo API key\s+(\S+)", line)))
    try:
        yield {"home": home, "gateway": gateway, "key": key}
    finally:
        assert up.stop() == 0


def cli(home, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clearhouse", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CLEARHOUSE_HOME": str(home)}, timeout=120)


class Api:
    def __init__(self, base: str, key: str) -> None:
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def post(self, path: str, body: dict, *, key: str | None = None) -> httpx.Response:
        return self.http.post(path, json=body, headers={"Idempotency-Key": key or uuid.uuid4().hex})

    def get(self, path: str, **params) -> httpx.Response:
        return self.http.get(path, params=params)

    def account(self, name: str, normal_balance: str, **extra) -> str:
        response = self.post("/v1/ledger/accounts", {"name": name, "currency": "EUR",
                                                     "normal_balance": normal_balance, **extra})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def funded_customer(self, amount: int) -> str:
        customer = self.account(f"customer {uuid.uuid4().hex[:6]}", "credit")
        if amount:
            funding = self.account("funding", "debit", allow_negative=True)
            response = self.post("/v1/ledger/transactions", {"entries": [
                {"account_id": funding, "direction": "debit", "amount": amount},
                {"account_id": customer, "direction": "credit", "amount": amount}]})
            assert response.status_code == 201, response.text
        return customer

    def pay(self, account: str, amount: int, reference: str = "invoice 42") -> dict:
        response = self.post("/v1/payments", {"amount": amount, "currency": "EUR", "debit_account_id": account,
                                              "payee": {"name": "Jane Doe", "iban": CUSTOMER_IBAN},
                                              "reference": reference})
        assert response.status_code == 201, response.text
        return response.json()

    @staticmethod
    def eventually(fetch, done, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while not done(value := fetch()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return value

    def until_status(self, payment_id: str, *statuses: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            payment = self.get(f"/v1/payments/{payment_id}").json()
            if payment["status"] in statuses:
                return payment
            time.sleep(0.2)
        raise AssertionError(f"payment {payment_id} stayed {payment['status']}, expected {statuses}")


def test_small_payment_is_auto_approved_reserved_submitted_settled_and_posted(running):
    api = Api(running["gateway"], running["key"])
    customer = api.funded_customer(500_000)
    payment = api.pay(customer, 1_500)
    assert payment["status"] == "pending_approval" and payment["payee"]["iban"] != CUSTOMER_IBAN
    settled = api.until_status(payment["id"], "settled", "failed")
    assert settled["status"] == "settled", settled
    # The ledger posts the hold when it consumes payment.settled: eventually, not at once.
    balance = api.eventually(lambda: api.get(f"/v1/ledger/accounts/{customer}/balance").json(),
                             lambda b: b["posted"] == 498_500)
    assert (balance["posted"], balance["available"]) == (498_500, 498_500)

    timeline = api.get(f"/v1/payments/{payment['id']}/timeline").json()
    kinds = [(e["service"], e["type"]) for e in timeline["events"]]
    for expected in [("payments", "payment.created.v1"), ("approvals", "approval.granted.v1"),
                     ("ledger", "ledger.hold.placed.v1"), ("payments", "payment.settled.v1"),
                     ("ledger", "ledger.hold.posted.v1")]:
        assert expected in kinds, kinds
    times = [e["occurred_at"] for e in timeline["events"]]
    assert times == sorted(times)
    granted = next(e for e in timeline["events"] if e["type"] == "approval.granted.v1")
    assert granted["actor"] == "system:policy"


def test_payment_beyond_available_funds_fails_with_insufficient_funds(running):
    api = Api(running["gateway"], running["key"])
    customer = api.funded_customer(1_000)
    payment = api.pay(customer, 1_500)
    failed = api.until_status(payment["id"], "failed", "settled")
    assert (failed["status"], failed["failure_reason"]) == ("failed", "insufficient_funds")
    balance = api.eventually(lambda: api.get(f"/v1/ledger/accounts/{customer}/balance").json(),
                             lambda b: b["pending"] == b["posted"])
    assert (balance["posted"], balance["available"]) == (1_000, 1_000)


def test_large_payment_waits_for_a_checker_who_is_not_the_maker(running):
    api = Api(running["gateway"], running["key"])
    customer = api.funded_customer(1_000_000)
    payment = api.pay(customer, 150_000)  # 1,500.00 EUR: one approver
    approval = None
    for _ in range(100):
        listed = api.get("/v1/approvals", status="pending", subject_type="payment").json()["data"]
        approval = next((a for a in listed if a["subject_id"] == payment["id"]), None)
        if approval:
            break
        time.sleep(0.2)
    assert approval and approval["required_approvals"] == 1
    maker = api.post(f"/v1/approvals/{approval['id']}/decisions", {"decision": "approve", "reason": "mine"})
    assert maker.status_code == 403 and maker.json()["code"] == "maker_cannot_decide"

    created = cli(running["home"], "keys", "create", "--tenant", "demo", "--principal", "checker",
                  "--scopes", "approvals:read,approvals:decide,payments:read", "--json")
    assert created.returncode == 0, created.stderr
    checker = Api(running["gateway"], json.loads(created.stdout)["key"])
    decided = checker.post(f"/v1/approvals/{approval['id']}/decisions", {"decision": "approve", "reason": "ok"})
    assert decided.status_code == 201, decided.text
    assert api.until_status(payment["id"], "settled", "failed")["status"] == "settled"


def test_a_retried_post_is_answered_from_the_first_without_a_second_payment(running):
    api = Api(running["gateway"], running["key"])
    customer = api.funded_customer(10_000)
    body = {"amount": 100, "currency": "EUR", "debit_account_id": customer,
            "payee": {"name": "Jane Doe", "iban": CUSTOMER_IBAN}, "reference": "retry me"}
    first = api.post("/v1/payments", body, key="retry-1")
    second = api.post("/v1/payments", body, key="retry-1")
    assert first.status_code == second.status_code == 201
    assert second.json()["id"] == first.json()["id"] and second.headers["Idempotent-Replayed"] == "true"
    assert api.post("/v1/payments", {**body, "amount": 101}, key="retry-1").status_code == 422


def test_verify_finds_every_invariant_intact_after_the_flows(running):
    api = Api(running["gateway"], running["key"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # quiescence: nothing pending or in flight
        pending = api.get("/v1/payments", status="approved").json()["data"] + \
            api.get("/v1/payments", status="submitted").json()["data"]
        if not pending:
            break
        time.sleep(0.5)
    result = cli(running["home"], "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✗" not in result.stdout


def test_one_trace_spans_gateway_payments_relay_kafka_approvals_and_ledger(running):
    api = Api(running["gateway"], running["key"])
    payment = api.pay(api.funded_customer(100_000), 2_500)
    api.until_status(payment["id"], "settled", "failed")
    timeline = api.get(f"/v1/payments/{payment['id']}/timeline").json()["events"]
    trace_id = next(e["trace_id"] for e in timeline if e["type"] == "payment.created.v1")
    # The approval and the hold are caused by the create request: the same trace continues.
    assert next(e["trace_id"] for e in timeline if e["type"] == "ledger.hold.placed.v1") == trace_id
    deadline = time.monotonic() + 30
    while True:  # span exporters flush in batches
        shown = cli(running["home"], "trace", trace_id)
        services = set(re.findall(r"\b(gateway|payments|approvals|ledger)\b", shown.stdout))
        if shown.returncode == 0 and services == {"gateway", "payments", "approvals", "ledger"} \
                and "[→kafka]" in shown.stdout and "[kafka→]" in shown.stdout:
            break
        assert time.monotonic() < deadline, shown.stdout + shown.stderr
        time.sleep(0.5)
    by_payment = cli(running["home"], "trace", "--payment", payment["id"])
    assert by_payment.returncode == 0 and trace_id in by_payment.stdout
