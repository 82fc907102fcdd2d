"""The sandbox processor over real HTTP: idempotent payouts, deterministic triggers,
signed webhooks (twice, out of order, or not at all when asked), refunds, restarts,
and the daily statement in CSV and camt.053."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import uuid
from datetime import datetime, timezone
from xml.etree import ElementTree as ET

import httpx
import orjson
import pytest
from fastapi import FastAPI, Request

from services.sandbox.api import create_app
from services.sandbox.settings import Settings
from services.sandbox.statements import CAMT053_NS
from services.sandbox.tests.support import eventually, serving

SECRET = "whsec_sandbox_test"
NS = {"c": CAMT053_NS}
IBAN = "DE89370400440532013000"
# A fixed clock: everything settles on 2025-01-31 (the sleeps stay real).
DAY = datetime(2025, 1, 31, 12, 0, tzinfo=timezone.utc)


class Receiver:
    """Plays the payments webhook endpoint: records what arrives and checks signatures."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.app = FastAPI()

        @self.app.post("/hook")
        async def hook(request: Request) -> dict:
            body = await request.body()
            header = request.headers["clearhouse-signature"]
            parts = dict(p.split("=", 1) for p in header.split(","))
            expected = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(expected, parts["v1"])
            self.received.append(orjson.loads(body))
            return {"received": True}

    def types(self, payout_id: str) -> list[str]:
        return [e["type"] for e in self.received if e["data"]["object"]["id"] == payout_id]


@pytest.fixture(scope="module")
async def sandbox(tmp_path_factory):
    receiver = Receiver()
    async with serving(receiver.app) as hook_url:
        settings = Settings(webhook_url=f"{hook_url}/hook", webhook_secret=SECRET, processing_delay_s=0.02,
                            settle_delay_s=0.05, refund_delay_s=0.05, stall_s=0.1,
                            db_path=str(tmp_path_factory.mktemp("sandbox") / "state.sqlite3"))
        app = create_app(settings, clock=lambda: DAY.timestamp())
        async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
            yield http, receiver, app


def payout(amount: int = 1_234, currency: str = "EUR", reference: str = "inv", e2e: str | None = None) -> dict:
    return {"amount": amount, "currency": currency, "creditor": {"name": "Jane Doe", "iban": IBAN},
            "reference": reference, "end_to_end_id": e2e or str(uuid.uuid4())}


async def post(http, path: str, body: dict, key: str | None = None) -> httpx.Response:
    return await http.post(path, json=body, headers={"Idempotency-Key": key or str(uuid.uuid4())})


async def final(http, payout_id: str) -> dict:
    async def done():
        found = (await http.get(f"/v1/payouts/{payout_id}")).json()
        return found if found["status"] in ("settled", "failed") else None

    return await eventually(done, timeout=10)


async def test_a_payout_settles_and_is_announced_in_order(sandbox):
    http, receiver, _ = sandbox
    created = await post(http, "/v1/payouts", payout())
    assert created.status_code == 201
    body = created.json()
    assert body["status"] == "pending" and body["id"].startswith("po_")
    assert body["creditor"] == {"iban": "DE89********3000"}  # the sandbox keeps no plaintext
    settled = await final(http, body["id"])
    assert settled["status"] == "settled" and settled["value_date"] == "2025-01-31"
    await eventually(lambda: len(receiver.types(body["id"])) == 2)
    assert receiver.types(body["id"]) == ["payout.processing", "payout.settled"]


async def test_the_same_request_id_never_pays_twice(sandbox):
    http, _, _ = sandbox
    key, body = str(uuid.uuid4()), payout()
    first = await post(http, "/v1/payouts", body, key)
    again = await post(http, "/v1/payouts", body, key)
    other = await post(http, "/v1/payouts", {**body, "amount": 999}, key)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    found = await http.get(f"/v1/payouts/by-request/{key}")
    assert found.json()["id"] == first.json()["id"]
    missing = await http.get(f"/v1/payouts/by-request/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.json()["code"] == "resource_missing"


@pytest.mark.parametrize("amount, code", [(10_013, "AM04"), (10_014, "AC04")])
async def test_failure_triggers(sandbox, amount, code):
    http, receiver, _ = sandbox
    created = (await post(http, "/v1/payouts", payout(amount))).json()
    failed = await final(http, created["id"])
    assert (failed["status"], failed["failure_code"]) == ("failed", code)
    await eventually(lambda: "payout.failed" in receiver.types(created["id"]))


async def test_refusal_trigger_answers_the_same_on_retry(sandbox):
    http, _, _ = sandbox
    key = str(uuid.uuid4())
    first = await post(http, "/v1/payouts", payout(10_022), key)
    again = await post(http, "/v1/payouts", payout(10_022, e2e=None) | {"end_to_end_id": "x"}, key)
    assert first.status_code == 422 and first.json()["code"] == "invalid_creditor_account"
    assert again.status_code == 409  # same key, other body
    assert (await http.get(f"/v1/payouts/by-request/{key}")).status_code == 404


async def test_flaky_answers_503_twice_then_accepts(sandbox):
    http, _, _ = sandbox
    key, body = str(uuid.uuid4()), payout(reference="FLAKY x")
    codes = [(await post(http, "/v1/payouts", body, key)).status_code for _ in range(3)]
    assert codes == [503, 503, 201]


async def test_timeout_stores_first_then_stalls(sandbox):
    http, _, _ = sandbox
    key, body = str(uuid.uuid4()), payout(reference="TIMEOUT")
    with pytest.raises(httpx.ReadTimeout):
        await http.post("/v1/payouts", json=body, headers={"Idempotency-Key": key}, timeout=0.05)
    again = await post(http, "/v1/payouts", body, key)
    assert again.status_code == 200  # it was stored the first time


@pytest.mark.parametrize("reference, expected", [
    ("DOUBLE", ["payout.processing", "payout.processing", "payout.settled", "payout.settled"]),
    ("OUTOFORDER", ["payout.settled", "payout.processing"]),
    ("NOWEBHOOK", []),
])
async def test_webhook_delivery_triggers(sandbox, reference, expected):
    http, receiver, _ = sandbox
    created = (await post(http, "/v1/payouts", payout(reference=reference))).json()
    await final(http, created["id"])
    await asyncio.sleep(0.3)
    assert sorted(receiver.types(created["id"])) == sorted(expected)
    if reference == "OUTOFORDER":
        assert receiver.types(created["id"]) == expected
    if reference == "DOUBLE":
        ids = [e["id"] for e in receiver.received if e["data"]["object"]["id"] == created["id"]]
        assert len(set(ids)) == 2  # each event twice, under its own id


async def test_refunds_within_the_payout(sandbox):
    http, receiver, _ = sandbox
    settled = await final(http, (await post(http, "/v1/payouts", payout(5_000))).json()["id"])
    refund = {"payout_id": settled["id"], "amount": 3_000, "currency": "EUR", "end_to_end_id": str(uuid.uuid4())}
    created = await post(http, "/v1/refunds", refund)
    assert created.status_code == 201
    too_much = await post(http, "/v1/refunds", {**refund, "amount": 2_001})
    assert too_much.status_code == 422 and too_much.json()["code"] == "refund_exceeds_payout"
    wrong = await post(http, "/v1/refunds", {**refund, "currency": "USD"})
    assert wrong.json()["code"] == "currency_mismatch"
    pending = (await post(http, "/v1/payouts", payout(reference="x"))).json()
    early = await post(http, "/v1/refunds", {**refund, "payout_id": pending["id"], "amount": 1})
    assert early.status_code == 422 and early.json()["code"] == "payout_not_settled"
    await eventually(lambda: "refund.succeeded" in receiver.types(created.json()["id"]))


@pytest.mark.parametrize("body", [
    {"amount": "1"}, {**payout(), "amount": 1.5}, {**payout(), "currency": "XYZ"},
    {**payout(), "creditor": {"name": "J", "iban": "DE00370400440532013000"}}, {**payout(), "extra": 1},
])
async def test_invalid_payouts_are_422_problems(sandbox, body):
    http, _, _ = sandbox
    response = await post(http, "/v1/payouts", body)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


async def test_missing_idempotency_key_is_refused(sandbox):
    http, _, _ = sandbox
    response = await http.post("/v1/payouts", json=payout())
    assert response.status_code == 422 and response.json()["code"] == "validation_error"


async def test_statements_in_csv_and_camt053(sandbox):
    http, _, app = sandbox
    e2e = str(uuid.uuid4())
    await final(http, (await post(http, "/v1/payouts", payout(1_999, e2e=e2e))).json()["id"])
    yen = str(uuid.uuid4())
    await final(http, (await post(http, "/v1/payouts", payout(5_000, "JPY", e2e=yen))).json()["id"])

    csv_response = await http.get("/statements/2025-01-31.csv")
    assert csv_response.status_code == 200 and csv_response.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(csv_response.text)))
    mine = next(line for line in lines if line["reference"] == e2e)
    assert mine == {**mine, "credit_debit": "DBIT", "amount": "19.99", "currency": "EUR",
                    "value_date": "2025-01-31", "type": "payout"}
    assert next(line for line in lines if line["reference"] == yen)["amount"] == "5000"

    xml = await http.get("/statements/2025-01-31.camt053.xml")
    assert xml.status_code == 200 and xml.headers["content-type"] == "application/xml"
    root = ET.fromstring(xml.content)
    assert root.tag == f"{{{CAMT053_NS}}}Document"
    statements = root.findall("c:BkToCstmrStmt/c:Stmt", NS)
    eur = next(s for s in statements if s.findtext("c:Acct/c:Ccy", namespaces=NS) == "EUR")
    assert eur.findtext("c:FrToDt/c:FrDtTm", namespaces=NS) == "2025-01-31T00:00:00+00:00"
    assert eur.findtext("c:FrToDt/c:ToDtTm", namespaces=NS) == "2025-01-31T23:59:59+00:00"
    entry = next(n for n in eur.findall("c:Ntry", NS)
                 if n.findtext("c:NtryDtls/c:TxDtls/c:Refs/c:EndToEndId", namespaces=NS) == e2e)
    assert entry.findtext("c:Amt", namespaces=NS) == "19.99" and entry.find("c:Amt", NS).get("Ccy") == "EUR"
    assert entry.findtext("c:CdtDbtInd", namespaces=NS) == "DBIT"
    assert entry.findtext("c:ValDt/c:Dt", namespaces=NS) == "2025-01-31"
    assert entry.findtext("c:Sts/c:Cd", namespaces=NS) == "BOOK"
    # The balances add up: closing = opening + credits - debits.
    balances = {b.findtext("c:Tp/c:CdOrPrtry/c:Cd", namespaces=NS): b for b in eur.findall("c:Bal", NS)}

    def signed(element) -> int:
        value = round(float(element.findtext("c:Amt", namespaces=NS)) * 100)
        return value if element.findtext("c:CdtDbtInd", namespaces=NS) == "CRDT" else -value

    net = sum(signed(n) for n in eur.findall("c:Ntry", NS))
    assert signed(balances["CLBD"]) == signed(balances["OPBD"]) + net
    assert eur.findtext("c:TxsSummry/c:TtlNtries/c:NbOfNtries", namespaces=NS) == str(len(eur.findall("c:Ntry", NS)))
    # Children in the order the XSD prescribes.
    order = [child.tag.split("}")[1] for child in eur]
    assert order[:7] == ["Id", "ElctrncSeqNb", "CreDtTm", "FrToDt", "Acct", "Bal", "Bal"]
    assert order[7] == "TxsSummry" and set(order[8:]) == {"Ntry"}

    empty = await http.get("/statements/2025-01-30.csv")
    assert empty.text.strip().splitlines() == [
        "booking_date,value_date,credit_debit,amount,currency,reference,type,processor_reference"]
    for bad in ("/statements/yesterday.csv", "/statements/2025-13-01.camt053.xml", "/statements/2025-1-1.csv"):
        response = await http.get(bad)
        assert response.status_code == 404 and response.json()["code"] == "resource_missing"


async def test_state_survives_a_restart(tmp_path):
    settings = Settings(webhook_url="http://127.0.0.1:9/unreachable", webhook_secret=SECRET, processing_delay_s=5,
                        settle_delay_s=0.01, webhook_attempts=1, db_path=str(tmp_path / "s.sqlite3"))
    key, body = str(uuid.uuid4()), payout()
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        first = (await post(http, "/v1/payouts", body, key)).json()
    fast = settings.model_copy(update={"processing_delay_s": 0.01})
    async with serving(create_app(fast)) as url, httpx.AsyncClient(base_url=url) as http:
        again = await post(http, "/v1/payouts", body, key)
        assert again.status_code == 200 and again.json()["id"] == first["id"]
        assert (await final(http, first["id"]))["status"] == "settled"  # the lifecycle resumed


async def test_an_api_key_is_required_when_configured(tmp_path):
    settings = Settings(webhook_secret=SECRET, api_key="sk_sandbox", db_path=":memory:")
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        refused = await http.get("/statements/2025-01-31.csv")
        wrong = await http.get("/statements/2025-01-31.csv", headers={"Authorization": "Bearer nope"})
        allowed = await http.get("/statements/2025-01-31.csv", headers={"Authorization": "Bearer sk_sandbox"})
        health = await http.get("/healthz")
    assert refused.status_code == wrong.status_code == 401 and refused.json()["code"] == "invalid_api_key"
    assert allowed.status_code == 200 and health.status_code == 200


async def test_chaos_mode_delivers_every_webhook_one_to_three_times_out_of_order(tmp_path):
    receiver = Receiver()
    async with serving(receiver.app) as hook_url:
        settings = Settings(webhook_url=f"{hook_url}/hook", webhook_secret=SECRET, processing_delay_s=0.0,
                            settle_delay_s=0.0, db_path=str(tmp_path / "state.sqlite3"),
                            webhook_chaos_seed=7, webhook_chaos_max_delay_s=0.5)
        async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
            ids = [(await post(http, "/v1/payouts", payout(reference=f"chaos {n}"))).json()["id"] for n in range(8)]
            for payout_id in ids:
                await final(http, payout_id)
            # Every event arrives at least once: processing and the final word, per payout.
            await eventually(lambda: all({"payout.processing", "payout.settled"} <= set(receiver.types(i))
                                         for i in ids), timeout=10)
            await asyncio.sleep(0.6)  # the last copies are at most 0.5 s behind
    copies = [[e["id"] for e in receiver.received if e["type"] == kind and e["data"]["object"]["id"] == i]
              for i in ids for kind in ("payout.processing", "payout.settled")]
    assert all(1 <= len(c) <= 3 and len(set(c)) == 1 for c in copies), copies  # redeliveries keep the event id
    assert sum(len(c) for c in copies) > len(copies)  # some were duplicated
    # Out of order: with no settle delay the copies race, so some payout is told
    # `settled` before (a copy of) `processing`.
    assert any(receiver.types(i).index("payout.settled") < len(receiver.types(i)) - 1
               and "payout.processing" in receiver.types(i)[receiver.types(i).index("payout.settled"):]
               for i in ids)
