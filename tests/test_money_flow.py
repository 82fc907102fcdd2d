"""The money flow of the design, end to end, on the platform `clearhouse up` starts: every
call goes through the gateway with an API key, every hop between services is a real
Kafka event, and `clearhouse verify` finds every invariant intact afterwards. The same
platform then answers for its operators: one trace per payment across every process, every
metric the dashboards and alerts query really exported, every process ready.

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
from prometheus_client.parser import text_string_to_metric_families

from clearhouse import traceview
from clearhouse.up import API_PORTS
from tests import metric_names
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


# The hops of one payment's trace, in causal order: (service, role, span kind, event type).
# Each one's span is an ancestor of the next: the trace crosses every process on the way.
TRACE_HOPS = [
    ("gateway", "api", "SERVER", None),
    ("payments", "api", "SERVER", None),
    ("payments", "relay", "PRODUCER", "payment.created.v1"),
    ("approvals", "consumer", "CONSUMER", "payment.created.v1"),
    ("approvals", "relay", "PRODUCER", "approval.granted.v1"),
    ("payments", "consumer", "CONSUMER", "approval.granted.v1"),
    ("payments", "relay", "PRODUCER", "payment.approved.v1"),
    ("ledger", "consumer", "CONSUMER", "payment.approved.v1"),
]


def hop_of(span: traceview.Span) -> tuple:
    return (span.service.removeprefix("clearhouse-"), span.role or "api", span.kind,
            span.attributes.get("clearhouse.event_type"))


def causal_chain(spans: list[traceview.Span], last: tuple) -> list[tuple]:
    """The hops from the root down to the span that is `last`, through parent links."""
    by_id = {s.span_id: s for s in spans}
    ends = [s for s in spans if hop_of(s) == last]
    if not ends:
        return []
    chain, span = [], ends[0]
    while span is not None:
        chain.append(hop_of(span))
        span = by_id.get(span.parent_span_id) if span.parent_span_id != span.span_id else None
    return list(reversed(chain))


def is_subsequence(wanted: list, chain: list) -> bool:
    remaining = iter(chain)
    return all(any(hop[:3] == w[:3] and (w[3] is None or hop[3] == w[3]) for hop in remaining) for w in wanted)


def test_one_trace_spans_gateway_payments_relay_kafka_approvals_payments_and_ledger(running):
    api = Api(running["gateway"], running["key"])
    payment = api.pay(api.funded_customer(100_000), 2_500)
    api.until_status(payment["id"], "settled", "failed")
    timeline = api.get(f"/v1/payments/{payment['id']}/timeline").json()["events"]
    trace_id = next(e["trace_id"] for e in timeline if e["type"] == "payment.created.v1")
    # The approval and the hold are caused by the create request: the same trace continues.
    for caused in ("approval.granted.v1", "payment.approved.v1", "ledger.hold.placed.v1"):
        assert next(e["trace_id"] for e in timeline if e["type"] == caused) == trace_id, caused

    deadline = time.monotonic() + 60
    while True:  # span exporters flush in batches
        spans = traceview.find_trace(traceview.load_spans(running["home"] / "traces"), trace_id)
        chain = causal_chain(spans, TRACE_HOPS[-1])
        if is_subsequence(TRACE_HOPS, chain):
            break
        assert time.monotonic() < deadline, f"hops of trace {trace_id}: {chain or sorted(set(map(hop_of, spans)))}"
        time.sleep(0.5)

    shown = cli(running["home"], "trace", trace_id)
    assert shown.returncode == 0, shown.stderr
    header, *rows = shown.stdout.splitlines()
    assert header.startswith(f"trace {trace_id} · ") and "\n\n" not in shown.stdout.strip(), "one trace"
    assert {"gateway", "payments", "approvals", "ledger"} <= set(header.split(" · ")[2].split(", "))
    # Every Kafka hop of the chain is a row of the waterfall, drawn by the process that made it.
    for service, role, kind, _ in TRACE_HOPS[2:]:
        marker, topic = ("[→kafka]", f"{service}.events") if kind == "PRODUCER" else ("[kafka→]", None)
        assert any(marker in row and f" {service}/{role} " in row and (topic is None or topic in row) for row in rows), \
            f"no {marker} row of {service}/{role}:\n{shown.stdout}"
    by_payment = cli(running["home"], "trace", "--payment", payment["id"])
    assert by_payment.returncode == 0 and f"trace {trace_id}" in by_payment.stdout


# ── metrics: what the dashboards and alerts query is what the processes export ────────────


def scrape_targets(home) -> dict[str, int]:
    """Every process with /metrics: the APIs (not the sandbox processor, a stand-in with
    /healthz only) and each service's relay and consumer, from the ports `up` chose."""
    ports = json.loads((home / "state.json").read_text())["ports"]
    targets = {name: ports[name] for name in API_PORTS if name != "sandbox"}
    targets |= {name.removesuffix("-metrics"): port for name, port in ports.items() if name.endswith("-metrics")}
    return targets


def scrape(port: int, path: str = "/metrics") -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=30)


def sample_value(exposition: str, name: str, **labels) -> float:
    return sum(s.value for f in text_string_to_metric_families(exposition) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_every_metric_the_dashboards_and_alerts_name_is_exported_by_a_live_process(running):
    api = Api(running["gateway"], running["key"])
    payment = api.pay(api.funded_customer(50_000), 1_000)
    assert api.until_status(payment["id"], "settled", "failed")["status"] == "settled"
    targets = scrape_targets(running["home"])
    assert len(targets) == 5 + 2 * 4, targets  # 4 service APIs and the gateway; a relay and a consumer each

    # The flow shows in the domain counters once the relays and the ledger caught up.
    def settled_and_posted() -> bool:
        published = sample_value(scrape(targets["payments-relay"]).text, "clearhouse_events_published_total",
                                 service="payments", type="payment.settled.v1")
        posted = sample_value(scrape(targets["ledger-consumer"]).text, "clearhouse_ledger_transactions_posted_total",
                              kind="hold_posted")
        return published >= 1 and posted >= 1

    assert Api.eventually(settled_and_posted, bool, timeout=60)

    exported_by: dict[str, set[str]] = {}
    for process, port in targets.items():
        response = scrape(port)
        assert response.status_code == 200, process
        for name in metric_names.exported(response.text):
            exported_by.setdefault(name, set()).add(process)
    referenced = metric_names.referenced()
    missing = {name: sorted(where) for name, where in referenced.items() if name not in exported_by}
    assert not missing, f"queried by dashboards or alerts but exported by no process: {missing}"
    # The domain gauges come from the consumer of the service that owns the rows.
    for gauge, owner in [("clearhouse_payments_in_flight", "payments-consumer"),
                         ("clearhouse_approvals_pending", "approvals-consumer"),
                         ("clearhouse_reconciliation_breaks_open", "reconciliation-consumer")]:
        assert owner in exported_by[gauge], (gauge, exported_by[gauge])
    in_flight = scrape(targets["payments-consumer"]).text
    assert {s.labels["status"] for f in text_string_to_metric_families(in_flight) for s in f.samples
            if s.name == "clearhouse_payments_in_flight"} == {"pending_approval", "approved", "submitted"}


def test_every_process_is_ready_with_database_migrations_and_broker_checked(running):
    for process, port in scrape_targets(running["home"]).items():
        ready = scrape(port, "/readyz")
        assert ready.status_code == 200, (process, ready.text)
        expected = {"database", "migrations"} | (set() if process == "gateway" else {"broker"})
        assert ready.json()["checks"] == dict.fromkeys(expected, "ok"), process
        assert scrape(port, "/healthz").status_code == 200, process
