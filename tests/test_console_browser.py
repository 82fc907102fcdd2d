"""The operations console in a real browser (Debian's headless Chromium, driven by
Playwright) on the platform `clearhouse up` starts, as its users work with it:

    checker  signs in (keyboard only) ─▶ inbox ─▶ approves a 1,500.00 EUR payment another
             principal made ─▶ the payment's timeline shows it settle, with their name
    maker    sees their own payment not approvable; a forced submission is refused by
             the approvals service (maker_cannot_decide)
    analyst  sees the reconciliation run and its breaks ─▶ resolves one with a reason
    on-call  sees every process's health from its own /metrics

A screenshot of each page is kept under .artifacts/console/ (ignored by git), to look at.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from datetime import date

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.running import ROOT, Up
from tests.test_money_flow import Api, cli

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / ".artifacts" / "console"
TRACE_UI = "http://127.0.0.1:16686/trace/{trace_id}"
CHECKER_SCOPES = "approvals:read,approvals:decide,payments:read,reconciliation:read,reconciliation:write"
UI_TIMEOUT_MS = 30_000  # a slow shared machine: settling takes several event hops


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    home = tmp_path_factory.mktemp("console") / "home"
    up = Up(home, CONSOLE_TRACE_URL=TRACE_UI, CONSOLE_POLL_INTERVAL_S="1")
    lines = up.wait_for(r"Ctrl-C stops everything", timeout=180)
    gateway = next(m.group(1) for line in lines if (m := re.search(r"gateway URL\s+(http://\S+)", line)))
    key = next(m.group(1) for line in lines if (m := re.search(r"demo API key\s+(\S+)", line)))
    assert any(f"{gateway}/console" in line for line in lines)
    created = cli(home, "keys", "create", "--tenant", "demo", "--principal", "checker", "--scopes", CHECKER_SCOPES,
                  "--json")
    assert created.returncode == 0, created.stderr
    try:
        yield {"home": home, "gateway": gateway, "maker": key, "checker": json.loads(created.stdout)["key"]}
    finally:
        assert up.stop() == 0


@pytest.fixture(scope="module")
def chromium():
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # only this run's pages
    ARTIFACTS.mkdir(parents=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    failures: list[str] = []
    page.on("console", lambda message: message.type == "error" and failures.append(message.text))
    page.console_errors = failures  # a test that provokes a refusal clears the one it expects
    yield page
    context.close()
    assert not failures, f"the browser reported errors: {failures}"  # e.g. a CSP violation


def screenshot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def assert_labelled(page: Page) -> None:
    """Every control a person can use has a label (or an accessible name)."""
    unlabelled = page.evaluate("""() => [...document.querySelectorAll(
        'input:not([type=hidden]), select, textarea, button')].filter(el =>
        !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim()
      ).map(el => el.outerHTML)""")
    assert unlabelled == []


def sign_in(page: Page, base: str, key: str, then: str = "/console/approvals") -> None:
    page.goto(f"{base}{then}")
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    expect(page.get_by_label("API key")).to_be_focused()  # keyboard only from here
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(re.escape(then) + "$"))


def pending_payment(api: Api, amount: int = 150_000) -> tuple[dict, dict]:
    """A payment (1,500.00 EUR by default: one approver) and its pending approval."""
    payment = api.pay(api.funded_customer(1_000_000), amount, reference=f"console {uuid.uuid4().hex[:6]}")
    approval = api.eventually(
        lambda: next((a for a in api.get("/v1/approvals", status="pending", subject_type="payment").json()["data"]
                      if a["subject_id"] == payment["id"]), None),
        lambda found: found is not None, timeout=60)
    assert approval, f"no approval request for {payment['id']}"
    return payment, approval


def test_a_checker_approves_another_principals_payment_and_sees_it_settle(running, page):
    maker = Api(running["gateway"], running["maker"])
    payment, approval = pending_payment(maker)
    page.goto(f"{running['gateway']}/console/sign-in")
    assert_labelled(page)
    screenshot(page, "01-sign-in")
    sign_in(page, running["gateway"], running["checker"])
    row = page.locator(f"#approval-{approval['id']}")
    expect(row).to_contain_text("1,500.00 EUR")
    expect(row).to_contain_text("demo")  # the maker
    expect(row).to_contain_text("one approver from 1000")
    expect(row).to_contain_text("J*")  # the payee, masked
    assert_labelled(page)
    screenshot(page, "02-approvals-inbox")

    row.get_by_label("Reason").fill("Invoice 42 checked against the contract")
    # Enter in the reason field must not approve by itself (the form's default button is a
    # disabled one), so the choice is always explicit.
    assert row.evaluate("r => r.querySelector('form [type=submit]').disabled") is True
    row.get_by_label("Reason").press("Enter")
    expect(page).to_have_url(re.compile(r"/console/approvals$"))
    expect(row).to_have_count(1)
    row.get_by_role("button", name="Approve").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("status").first).to_contain_text("Approved")
    expect(page.locator(f"#approval-{approval['id']}")).to_have_count(0)

    page.get_by_role("navigation", name="Sections").get_by_role("link", name="Payments").click()
    listed = page.locator("table.grid tbody tr", has_text=payment["id"][:8])
    expect(listed).to_contain_text("1,500.00 EUR")
    assert_labelled(page)
    screenshot(page, "03-payments-list")
    listed.get_by_role("link").click()
    expect(page).to_have_url(re.compile(f"/console/payments/{payment['id']}$"))
    # The page refreshes its timeline by itself until the payment is final.
    expect(page.locator("#payment-status")).to_have_text("settled", timeout=60_000)
    timeline = page.locator("#timeline")
    expect(timeline.locator("tr[data-event='payment.settled.v1']")).to_have_count(1)
    decided = timeline.locator("tr[data-event='approval.decided.v1']")
    expect(decided).to_contain_text("user:checker")
    expect(decided).to_contain_text("Invoice 42 checked against the contract")
    expect(timeline.locator("tr[data-event='approval.granted.v1']")).to_contain_text("user:checker")
    created = timeline.locator("tr[data-event='payment.created.v1']")
    trace_id = re.search(r"clearhouse trace ([0-9a-f]{32})", created.inner_text()).group(1)
    expect(created.get_by_role("link", name=re.compile("Open trace"))).to_have_attribute(
        "href", TRACE_UI.format(trace_id=trace_id))
    assert_labelled(page)
    screenshot(page, "04-payment-timeline")


def test_the_inbox_updates_when_a_decision_lands_elsewhere(running, page):
    maker = Api(running["gateway"], running["maker"])
    _, approval = pending_payment(maker)
    sign_in(page, running["gateway"], running["checker"])
    row = page.locator(f"#approval-{approval['id']}")
    expect(row).to_have_count(1)
    other = cli(running["home"], "keys", "create", "--tenant", "demo", "--principal", f"checker-{uuid.uuid4().hex[:6]}",
                "--scopes", "approvals:read,approvals:decide", "--json")
    decided = Api(running["gateway"], json.loads(other.stdout)["key"]).post(
        f"/v1/approvals/{approval['id']}/decisions", {"decision": "reject", "reason": "duplicate of invoice 41"})
    assert decided.status_code == 201, decided.text
    expect(row).to_have_count(0)  # no reload: the page polled
    expect(page.locator("#inbox-updated")).to_contain_text("decided elsewhere")


def test_the_maker_cannot_approve_their_own_payment(running, page):
    maker = Api(running["gateway"], running["maker"])
    _, approval = pending_payment(maker, 160_000)
    sign_in(page, running["gateway"], running["maker"])
    row = page.locator(f"#approval-{approval['id']}")
    expect(row.get_by_role("button", name="Approve")).to_be_disabled()
    expect(row).to_contain_text("You made this request")
    screenshot(page, "05-maker-not-approvable")
    # Forced past the page (as a crafted request would be): the approvals service refuses.
    page.evaluate("id => document.querySelectorAll(`#approval-${id} [disabled]`)"
                  ".forEach(el => el.removeAttribute('disabled'))", approval["id"])
    row.get_by_label("Reason").fill("my own")
    row.get_by_role("button", name="Approve").click()
    alert = page.locator("#decision-error")
    expect(alert).to_contain_text("maker_cannot_decide")
    expect(alert).to_contain_text("not recorded")
    screenshot(page, "06-maker-refused")
    assert page.console_errors == ["Failed to load resource: the server responded with a status of 403 (Forbidden)"]
    page.console_errors.clear()
    assert maker.get(f"/v1/approvals/{approval['id']}").json()["status"] == "pending"


def test_an_analyst_resolves_a_reconciliation_break_with_a_reason(running, page):
    maker = Api(running["gateway"], running["maker"])
    stray = str(uuid.uuid4())  # a bank line no payment explains: missing_in_payments
    today = date.today().isoformat()
    csv = ("booking_date,value_date,credit_debit,amount,currency,reference,type,processor_reference\n"
           f"{today},{today},DBIT,12.34,EUR,{stray},payout,po_console\n")
    statement = maker.http.post("/v1/reconciliation/statements", content=csv.encode(),
                                headers={"Content-Type": "text/csv", "Idempotency-Key": uuid.uuid4().hex})
    assert statement.status_code == 201, statement.text
    run = maker.post("/v1/reconciliation/runs", {"statement_id": statement.json()["id"]})
    assert run.status_code == 202, run.text
    done = maker.eventually(lambda: maker.get(f"/v1/reconciliation/runs/{run.json()['id']}").json(),
                            lambda r: r["status"] in ("completed", "failed"), timeout=90)
    assert done["status"] == "completed", done

    sign_in(page, running["gateway"], running["checker"], then="/console/reconciliation")
    expect(page.locator(f"tr[data-run='{run.json()['id']}']")).to_contain_text("completed")
    card = page.locator("li[data-break]", has_text=stray)
    expect(card).to_contain_text("missing in payments")
    expect(card).to_contain_text("12.34 EUR")
    assert_labelled(page)
    screenshot(page, "07-reconciliation")

    card.get_by_label("Resolution").select_option("written_off")
    card.get_by_label("Reason").fill("Bank fee booked twice; refunded by the bank on the next statement")
    card.get_by_role("button", name=re.compile("Resolve")).click()
    expect(page.get_by_role("status").first).to_contain_text("Break resolved")
    expect(card).to_have_count(0)  # no longer among the open breaks
    resolved = page.locator("#resolved tbody tr").first
    expect(resolved).to_contain_text("checker")
    expect(resolved).to_contain_text("written off")
    screenshot(page, "08-break-resolved")
    found = maker.get("/v1/reconciliation/breaks", status="resolved").json()["data"]
    mine = next(b for b in found if b["reference"] == stray)
    assert (mine["resolved_by"], mine["resolution"]) == ("user:checker", "written_off")


def test_on_call_sees_every_process_health(running, page):
    sign_in(page, running["gateway"], running["checker"], then="/console/health")
    processes = page.locator("#processes tbody tr")
    expect(processes).to_have_count(13)  # the gateway and each service's api, relay and consumer
    deadline = time.monotonic() + 30
    while "down" in page.locator("#processes").inner_text():  # a worker may still be (re)starting
        assert time.monotonic() < deadline, page.locator("#processes").inner_text()
        page.reload()
    for service in ("payments", "approvals", "ledger", "reconciliation"):
        expect(page.locator(f"#services tr[data-service='{service}']")).to_have_count(1)
    expect(page.locator("#consumers tbody tr").first).not_to_contain_text("No consumer metrics")
    assert_labelled(page)
    screenshot(page, "09-health")
    page.goto(f"{running['gateway']}/console/payments/{uuid.uuid4()}")
    expect(page.get_by_role("alert")).to_contain_text("No payment with this id")
    expect(page.get_by_role("alert")).to_contain_text("request id")
    assert "Traceback" not in page.content()
    screenshot(page, "10-problem-page")
    assert page.console_errors == ["Failed to load resource: the server responded with a status of 404 (Not Found)"]
    page.console_errors.clear()
