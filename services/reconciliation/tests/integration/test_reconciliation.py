"""Three-way reconciliation end to end: payments and ledger events on the real broker
build the read model, statements go in through the API, the run worker reconciles, and
the breaks are exactly the differences that were planted, no more, no fewer."""

from __future__ import annotations

import uuid
from pathlib import Path

from services.reconciliation import jobs
from services.reconciliation.tests.integration.harness import (
    Day, breaks_of, eventually, headers, produce, rows, run_statement, sandbox_csv, scalar, stored_event, upload,
)
from services.reconciliation.verify import verify

SAMPLES = Path(__file__).parent.parent / "samples"
DAY = "2026-03-02"


def kinds(breaks: list[dict]) -> set[tuple]:
    return {(b["type"], b["source"], b["target_id"] or b["reference"]) for b in breaks}


async def event_types(sessionmaker, tenant: str) -> list[str]:
    return [r.type for r in await rows(sessionmaker, "SELECT type FROM events WHERE tenant_id = :t ORDER BY seq",
                                       t=tenant)]


async def test_a_clean_day_of_sandbox_payments_reconciles_three_ways(
        client, private_pem, tenant, settings, sessionmaker, read_model, db):
    day = Day(tenant)
    for i in range(20):
        day.add(1_000 + 37 * i)
    await day.publish(settings)
    await day.settled(sessionmaker)
    statement = await upload(client, private_pem, tenant, sandbox_csv([(str(p.id), p.amount, "EUR", DAY)
                                                                       for p in day.payments]))
    run = await run_statement(client, private_pem, tenant, statement.json()["id"], sessionmaker, settings)
    assert (run["status"], run["lines"], run["matched"], run["breaks"]) == ("completed", 20, 20, 0)
    assert run["by_rule"] == {"exact": 20}
    assert await breaks_of(client, private_pem, tenant) == []
    matches = await rows(sessionmaker, "SELECT rule, confidence, ledger FROM matches WHERE tenant_id = :t", t=tenant)
    assert {(m.rule, float(m.confidence), m.ledger) for m in matches} == {("exact", 1.0, "agrees")}
    assert await event_types(sessionmaker, tenant) == ["reconciliation.statement.imported.v1",
                                                       "reconciliation.run.requested.v1",
                                                       "reconciliation.run.completed.v1"]
    assert await verify(db.app_url) == []


async def test_every_break_type_is_found_exactly(client, private_pem, tenant, settings, sessionmaker, read_model, db):
    day = Day(tenant)
    clean = [day.add(1_000), day.add(2_000)]
    missing_in_statement = day.add(3_000)
    missing_in_ledger = day.add(4_000, ledger_posted=False)
    amount_off = day.add(5_000)
    wrong_currency = day.add(6_000)
    twice = day.add(7_000)
    ledger_off = day.add(8_000, ledger_amount=8_001)
    failed = day.add(9_000, status="failed", ledger_posted=False)
    await day.publish(settings)
    # The ledger posted money for a payment payments never told us about.
    ledger_only = Day(tenant)
    stray = ledger_only.add(4_400)
    await produce(settings.kafka_bootstrap_servers, settings.ledger_topic, ledger_only.ledger_events(stray))
    await eventually(lambda: scalar(sessionmaker, "SELECT count(*) = 8 FROM rm_ledger_totals WHERE tenant_id = :t",
                                    t=tenant))
    await eventually(lambda: scalar(sessionmaker, "SELECT count(*) = 1 FROM rm_payments WHERE tenant_id = :t "
                                                  "AND status = 'failed'", t=tenant))
    await day.settled(sessionmaker)
    unknown = str(uuid.uuid4())
    lines = [(str(p.id), p.amount, "EUR", DAY) for p in clean]
    lines += [(str(missing_in_ledger.id), 4_000, "EUR", DAY), (str(amount_off.id), 5_100, "EUR", DAY),
              (str(wrong_currency.id), 6_000, "USD", DAY), (str(twice.id), 7_000, "EUR", DAY),
              (str(twice.id), 7_000, "EUR", DAY), (str(ledger_off.id), 8_000, "EUR", DAY),
              (str(failed.id), 9_000, "EUR", DAY), (unknown, 1_234, "EUR", DAY)]
    statement = await upload(client, private_pem, tenant, sandbox_csv(lines))
    run = await run_statement(client, private_pem, tenant, statement.json()["id"], sessionmaker, settings)
    assert (run["lines"], run["matched"]) == (10, 3)  # the clean two and the first of the twice-reported
    found = await breaks_of(client, private_pem, tenant, run_id=run["id"])
    assert kinds(found) == {
        ("missing_in_statement", "payments", str(missing_in_statement.id)),
        ("missing_in_ledger", "ledger", str(missing_in_ledger.id)),
        ("amount_mismatch", "statement", str(amount_off.id)),
        ("currency_mismatch", "statement", str(wrong_currency.id)),
        ("duplicate", "statement", str(twice.id)),
        ("amount_mismatch", "ledger", str(ledger_off.id)),
        ("missing_in_payments", "statement", str(failed.id)),
        ("missing_in_payments", "statement", unknown),
        ("missing_in_payments", "ledger", str(stray.id)),
    }
    assert run["breaks"] == run["breaks_opened"] == 9
    by_type = {(b["type"], b["source"]): b for b in found}
    assert (by_type[("amount_mismatch", "statement")]["amount"],
            by_type[("amount_mismatch", "statement")]["expected_amount"]) == (5_100, 5_000)
    assert by_type[("duplicate", "statement")]["line_no"] == 7
    assert by_type[("currency_mismatch", "statement")]["currency"] == "USD"
    assert all(b["status"] == "open" and b["age_days"] == 0 and b["ageing_bucket"] == "0d" for b in found)
    opened = await scalar(sessionmaker, "SELECT count(*) FROM events WHERE tenant_id = :t "
                                        "AND type = 'reconciliation.break.opened.v1'", t=tenant)
    assert opened == 9
    assert await verify(db.app_url) == []

    # ── the same statement again: the same matches, the same breaks, nothing new ──
    before = await rows(sessionmaker, "SELECT line_no, target_id, rule, confidence, ledger FROM matches "
                                      "WHERE statement_id = :s ORDER BY line_no", s=uuid.UUID(statement.json()["id"]))
    ids_before = {b["id"] for b in found}
    again = await run_statement(client, private_pem, tenant, statement.json()["id"], sessionmaker, settings)
    assert (again["matched"], again["breaks"], again["breaks_opened"], again["breaks_resolved"]) == (3, 9, 0, 0)
    after = await rows(sessionmaker, "SELECT line_no, target_id, rule, confidence, ledger FROM matches "
                                     "WHERE statement_id = :s ORDER BY line_no", s=uuid.UUID(statement.json()["id"]))
    assert [tuple(r) for r in after] == [tuple(r) for r in before]
    assert {b["id"] for b in await breaks_of(client, private_pem, tenant)} == ids_before
    assert await scalar(sessionmaker, "SELECT count(*) FROM events WHERE tenant_id = :t "
                                      "AND type = 'reconciliation.break.opened.v1'", t=tenant) == 9

    # ── the ledger catches up: the next run clears that break, audited ──
    late = Day(tenant, payments=[missing_in_ledger])
    missing_in_ledger.ledger_posted = True
    await produce(settings.kafka_bootstrap_servers, settings.ledger_topic, late.ledger_events(missing_in_ledger))
    await eventually(lambda: scalar(sessionmaker, "SELECT count(*) = 9 FROM rm_ledger_totals WHERE tenant_id = :t",
                                    t=tenant))
    third = await run_statement(client, private_pem, tenant, statement.json()["id"], sessionmaker, settings)
    assert (third["matched"], third["breaks"], third["breaks_resolved"]) == (4, 8, 1)
    cleared = await breaks_of(client, private_pem, tenant, status="resolved")
    assert [(b["type"], b["resolution"], b["resolved_by"]) for b in cleared] == [
        ("missing_in_ledger", "cleared_by_run", "job:reconciliation-run")]
    assert await verify(db.app_url) == []


async def test_resolving_and_manually_matching_breaks_is_audited(
        client, private_pem, tenant, settings, sessionmaker, read_model, db):
    day = Day(tenant)
    off, unlisted = day.add(5_000), day.add(3_000)
    await day.publish(settings)
    await day.settled(sessionmaker)
    unknown = str(uuid.uuid4())
    statement = await upload(client, private_pem, tenant, sandbox_csv([(str(off.id), 5_050, "EUR", DAY),
                                                                       (unknown, 3_000, "EUR", DAY)]))
    run = await run_statement(client, private_pem, tenant, statement.json()["id"], sessionmaker, settings)
    found = {b["type"]: b for b in await breaks_of(client, private_pem, tenant)}
    assert set(found) == {"amount_mismatch", "missing_in_payments", "missing_in_statement"}

    url = f"/v1/reconciliation/breaks/{found['amount_mismatch']['id']}/resolve"
    accepted = await client.post(url, json={"resolution": "accepted", "reason": "processor fee of 0.50"},
                                 headers=headers(private_pem, tenant=tenant, principal="bob"))
    assert accepted.status_code == 200, accepted.text
    resolved = accepted.json()["resolved"][0]
    assert (resolved["status"], resolved["resolution"], resolved["resolved_by"], resolved["resolution_reason"]) == (
        "resolved", "accepted", "user:bob", "processor fee of 0.50")
    again = await client.post(url, json={"resolution": "accepted", "reason": "twice"},
                              headers=headers(private_pem, tenant=tenant))
    assert again.status_code == 409 and again.json()["code"] == "break_already_resolved"
    foreign = await client.post(url, json={"resolution": "accepted", "reason": "x"},
                                headers=headers(private_pem, tenant=f"{tenant}_x"))
    assert foreign.status_code == 404

    # The unknown reference is the unlisted payment (a typo no rule could undo): one manual
    # match explains both the line and the payment.
    manual = await client.post(
        f"/v1/reconciliation/breaks/{found['missing_in_payments']['id']}/resolve",
        json={"resolution": "manual_match", "reason": "bank mangled the reference",
              "match": {"target_id": str(unlisted.id)}},
        headers=headers(private_pem, tenant=tenant, principal="carol", idempotency_key="manual-1"))
    assert manual.status_code == 200, manual.text
    assert sorted(b["type"] for b in manual.json()["resolved"]) == ["missing_in_payments", "missing_in_statement"]
    match = (await rows(sessionmaker, "SELECT rule, matched_by, reason, ledger, run_id FROM matches "
                                      "WHERE target_id = :p", p=unlisted.id))[0]
    assert tuple(match) == ("manual", "user:carol", "bank mangled the reference", "agrees", None)
    resolved_events = await rows(sessionmaker, "SELECT actor, payload FROM events WHERE tenant_id = :t "
                                               "AND type = 'reconciliation.break.resolved.v1' ORDER BY seq", t=tenant)
    assert [(e.actor, e.payload["resolved_by"], e.payload["resolution"]) for e in resolved_events] == [
        ("user:bob", "user:bob", "accepted"), ("user:carol", "user:carol", "manual_match"),
        ("user:carol", "user:carol", "manual_match")]
    twice = await client.post(
        f"/v1/reconciliation/breaks/{found['missing_in_statement']['id']}/resolve",
        json={"resolution": "manual_match", "reason": "again", "match": {"line_no": 1}},
        headers=headers(private_pem, tenant=tenant))
    assert twice.status_code == 409

    # A re-run keeps the person's decisions: the manual match stands, nothing reopens.
    rerun = await run_statement(client, private_pem, tenant, statement.json()["id"], sessionmaker, settings)
    assert (rerun["matched"], rerun["breaks"], rerun["by_rule"]) == (1, 0, {"manual": 1})
    assert {b["status"] for b in await breaks_of(client, private_pem, tenant)} == {"resolved"}
    assert run["id"] != rerun["id"]
    assert await verify(db.app_url) == []


async def test_camt053_batch_entries_and_a_refund_reconcile(client, private_pem, tenant, settings, sessionmaker,
                                                            read_model, db):
    day = Day(tenant)
    a = day.add(12_500, id="0b8f3c1e-6a52-4d8e-9a41-5c2f7e9d1a01")
    for amount, payment_id in ((10_000, "1c7e2d4f-8b63-4e9f-8b52-6d3a8f0e2b02"),
                               (20_000, "2d6f1e5a-9c74-4fa0-8c63-7e4b9a1f3c03"),
                               (30_000, "3e5a0f6b-ad85-4a01-9d74-8f5cab204d04"),
                               (4_000, "4f4b1a7c-be96-4b12-ae85-9a6dbc315e05"),
                               (5_000, "5a3c2b8d-cfa7-4c23-bf96-ab7ecd426f06")):
        day.add(amount, id=payment_id)
    await day.publish(settings)
    await day.settled(sessionmaker)
    refund = stored_event("payment.refunded.v1", {
        "payment_id": str(a.id), "refund_id": "6b2d3c9e-d0b8-4d34-80a7-bc8fde537a07", "amount": 2_500,
        "currency": "EUR", "debit_account_id": "acct_customer_1", "refunded_total": 2_500,
        "status": "partially_refunded"}, tenant_id=tenant, aggregate_type="payment", aggregate_id=str(a.id))
    await produce(settings.kafka_bootstrap_servers, settings.payments_topic, [refund])
    await eventually(lambda: scalar(sessionmaker, "SELECT count(*) FROM rm_refunds WHERE tenant_id = :t", t=tenant))
    statement = await upload(client, private_pem, tenant, (SAMPLES / "camt053_v08_batch.xml").read_bytes(),
                             "application/xml")
    run = await run_statement(client, private_pem, tenant, statement.json()["id"], sessionmaker, settings)
    assert (run["lines"], run["matched"], run["breaks"]) == (7, 7, 0)
    assert run["by_rule"] == {"exact": 5, "one_to_many": 2}
    refund_match = await rows(sessionmaker, "SELECT target_kind, ledger FROM matches WHERE target_id = :r",
                              r=uuid.UUID("6b2d3c9e-d0b8-4d34-80a7-bc8fde537a07"))
    assert tuple(refund_match[0]) == ("refund", "not_applicable")
    assert await verify(db.app_url) == []


async def test_mt940_references_from_narratives_reconcile(client, private_pem, tenant, settings, sessionmaker,
                                                          read_model):
    day = Day(tenant)
    for amount, payment_id in ((12_500, "7c1e4daf-e1c9-4e45-91b8-cd90ef648b08"),
                               (10_000, "8d0f5eb0-f2da-4f56-a2c9-dea1f0759c09"),
                               (20_000, "9e1a6fc1-03eb-4a67-b3da-efb2a186ad10")):
        day.add(amount, id=payment_id)
    await day.publish(settings)
    await day.settled(sessionmaker)
    statement = await upload(client, private_pem, tenant, (SAMPLES / "mt940_sepa.sta").read_bytes(), "text/plain")
    run = await run_statement(client, private_pem, tenant, statement.json()["id"], sessionmaker, settings)
    assert (run["lines"], run["matched"]) == (4, 3)
    found = await breaks_of(client, private_pem, tenant)
    # The credit with EREF+NOTPROVIDED names nothing and matches nothing.
    assert [(b["type"], b["line_no"], b["amount"]) for b in found] == [("missing_in_payments", 4, 2_500)]


async def test_tolerance_fuzzy_and_batch_passes_follow_the_tenants_rules(
        client, private_pem, tenant, settings, sessionmaker, read_model, db):
    rules = await client.put("/v1/reconciliation/rules", json={"amount_tolerance_minor": 100, "date_window_days": 2},
                             headers=headers(private_pem, tenant=tenant))
    assert rules.status_code == 200 and rules.json()["version"] == 1
    day = Day(tenant)
    exact, drifted = day.add(1_000), day.add(2_000)
    typo, truncated = day.add(3_000), day.add(4_000)
    batch = [day.add(500, value_date=__import__("datetime").date(2026, 3, 3)) for _ in range(3)]
    await day.publish(settings)
    await day.settled(sessionmaker)
    hex_typo = str(typo.id)
    hex_typo = hex_typo[:-1] + ("0" if hex_typo[-1] != "0" else "1")
    statement = await upload(client, private_pem, tenant, sandbox_csv([
        (str(exact.id), 1_000, "EUR", DAY),
        (str(drifted.id), 1_950, "EUR", "2026-03-03"),  # 0.50 less, a day later: within the rules
        (hex_typo, 3_000, "EUR", DAY),  # one digit wrong
        (str(truncated.id).replace("-", "")[:30], 4_000, "EUR", DAY),  # cut short by the bank
        ("BATCH-2026-03-03", 1_500, "EUR", "2026-03-03"),  # the processor settled three as one line
    ]))
    run = await run_statement(client, private_pem, tenant, statement.json()["id"], sessionmaker, settings)
    assert (run["lines"], run["matched"], run["breaks"]) == (5, 5, 0)
    assert run["by_rule"] == {"exact": 1, "tolerance": 1, "fuzzy": 2, "one_to_many": 1}
    confidence = {r.target_id: float(r.confidence) for r in await rows(
        sessionmaker, "SELECT target_id, confidence FROM matches WHERE tenant_id = :t", t=tenant)}
    assert confidence[exact.id] == 1.0
    assert 0.5 <= confidence[drifted.id] < 1.0
    assert 0.5 <= confidence[typo.id] < 1.0
    assert {confidence[p.id] for p in batch} == {0.9}
    differences = await rows(sessionmaker, "SELECT amount_difference, date_difference FROM matches "
                                           "WHERE target_id = :p", p=drifted.id)
    assert tuple(differences[0]) == (-50, 1)
    # Without the tolerance the same statement is a break: rules are the tenant's.
    await client.put("/v1/reconciliation/rules", json={"amount_tolerance_minor": 0, "fuzzy": False,
                                                       "one_to_many": False},
                     headers=headers(private_pem, tenant=tenant))
    strict = await run_statement(client, private_pem, tenant, statement.json()["id"], sessionmaker, settings)
    assert strict["by_rule"] == {"exact": 1}
    assert {b["type"] for b in await breaks_of(client, private_pem, tenant, status="open")} == {
        "amount_mismatch", "missing_in_payments", "missing_in_statement"}
    assert await verify(db.app_url) == []


async def test_a_payment_reported_the_next_day_clears_yesterdays_break(
        client, private_pem, tenant, settings, sessionmaker, read_model, db):
    day = Day(tenant)
    on_time, late = day.add(1_000), day.add(2_000)
    await day.publish(settings)
    await day.settled(sessionmaker)
    first = await upload(client, private_pem, tenant, sandbox_csv([(str(on_time.id), 1_000, "EUR", DAY)]))
    await run_statement(client, private_pem, tenant, first.json()["id"], sessionmaker, settings)
    assert [b["type"] for b in await breaks_of(client, private_pem, tenant, status="open")] == ["missing_in_statement"]
    second = await upload(client, private_pem, tenant, sandbox_csv([(str(late.id), 2_000, "EUR", "2026-03-03")]))
    run = await run_statement(client, private_pem, tenant, second.json()["id"], sessionmaker, settings)
    assert (run["matched"], run["breaks"], run["breaks_resolved"]) == (1, 0, 1)
    cleared = await breaks_of(client, private_pem, tenant, status="resolved")
    assert [(b["type"], b["resolution"]) for b in cleared] == [("missing_in_statement", "matched_in_other_statement")]
    # Reported again in a third statement: that line is a duplicate, the payment stays matched once.
    third = await upload(client, private_pem, tenant, sandbox_csv([(str(late.id), 2_000, "EUR", "2026-03-04")]))
    await run_statement(client, private_pem, tenant, third.json()["id"], sessionmaker, settings)
    assert [b["type"] for b in await breaks_of(client, private_pem, tenant, statement_id=third.json()["id"])] == [
        "duplicate"]
    assert await verify(db.app_url) == []


async def test_runs_are_queued_once_per_statement_and_scoped_to_the_tenant(
        client, private_pem, tenant, settings, sessionmaker):
    statement = await upload(client, private_pem, tenant, sandbox_csv([(str(uuid.uuid4()), 100, "EUR", DAY)]))
    body = {"statement_id": statement.json()["id"]}
    first = await client.post("/v1/reconciliation/runs", json=body, headers=headers(private_pem, tenant=tenant))
    second = await client.post("/v1/reconciliation/runs", json=body, headers=headers(private_pem, tenant=tenant))
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["id"] == second.json()["id"] and first.json()["status"] == "queued"
    assert first.headers["location"] == f"/v1/reconciliation/runs/{first.json()['id']}"
    other = await client.get(f"/v1/reconciliation/runs/{first.json()['id']}",
                             headers=headers(private_pem, tenant=f"{tenant}_x"))
    assert other.status_code == 404
    missing = await client.post("/v1/reconciliation/runs", json={"statement_id": str(uuid.uuid4())},
                                headers=headers(private_pem, tenant=tenant))
    assert missing.status_code == 404 and missing.json()["code"] == "statement_not_found"
    foreign = await client.post("/v1/reconciliation/runs", json=body, headers=headers(private_pem,
                                                                                      tenant=f"{tenant}_x"))
    assert foreign.status_code == 404
    while await jobs.run_once(sessionmaker, settings=settings) is not None:
        pass
    done = await client.get(f"/v1/reconciliation/runs/{first.json()['id']}", headers=headers(private_pem,
                                                                                             tenant=tenant))
    assert done.json()["status"] == "completed" and done.json()["stage"] == "done"
    assert set(done.json()["stage_seconds"]) >= {"keyed", "write_matches", "breaks_written"}
