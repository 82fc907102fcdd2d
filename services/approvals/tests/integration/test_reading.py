"""Reading approvals: the contract's list with filters and cursor pagination, a request's
complete history, and the payment timeline's approvals part."""

from __future__ import annotations

from services.approvals.tests.integration.conftest import open_payment


async def test_the_list_filters_and_pages_without_skipping_or_repeating(http, as_, sessionmaker, settings, tenant):
    payments = [await open_payment(sessionmaker, settings, tenant, amount=amount)
                for amount in (100, 200_000, 300_000, 400_000, 500)]  # two auto-granted, three pending
    payee = (await http.post("/v1/approvals", json={"subject_type": "payee", "subject_id": "payee-7"},
                             headers=as_("filer"))).json()

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await http.get("/v1/approvals", params=params, headers=as_("auditor"))).json()
        seen += page["data"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert [item["id"] for item in seen] == [payee["id"], *[str(p.id) for p in reversed(payments)]]
    first = seen[-1]
    assert set(first) >= {"id", "subject_type", "subject_id", "status", "required_approvals", "decisions"}

    pending = (await http.get("/v1/approvals", params={"status": "pending", "subject_type": "payment"},
                              headers=as_("auditor"))).json()
    assert {item["subject_id"] for item in pending["data"]} == {p.subject_id for p in payments[1:4]}
    assert pending["next_cursor"] is None
    payees = (await http.get("/v1/approvals", params={"subject_type": "payee"}, headers=as_("auditor"))).json()
    assert [item["id"] for item in payees["data"]] == [payee["id"]]


async def test_bad_filters_and_cursors_are_refused_as_problems(http, as_):
    wrong_status = await http.get("/v1/approvals", params={"status": "approved"}, headers=as_("auditor"))
    wrong_cursor = await http.get("/v1/approvals", params={"cursor": "bm90LWEtY3Vyc29y"}, headers=as_("auditor"))
    assert wrong_status.status_code == 422
    assert wrong_cursor.status_code == 400 and wrong_cursor.json()["code"] == "invalid_cursor"


async def test_the_history_is_complete(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=2_000_000, maker="mia")
    await http.post(f"/v1/approvals/{request.id}/decisions", json={"decision": "approve", "reason": "known payee"},
                    headers=as_("ann", **{"X-Correlation-Id": "corr-ann"}))
    await http.post(f"/v1/approvals/{request.id}/decisions", json={"decision": "reject", "reason": "over budget"},
                    headers=as_("bob", **{"X-Correlation-Id": "corr-bob"}))

    detail = (await http.get(f"/v1/approvals/{request.id}", headers=as_("auditor"))).json()

    assert [(d["principal"], d["decision"], d["reason"], d["correlation_id"]) for d in detail["decisions"]] == [
        ("ann", "approve", "known payee", "corr-ann"), ("bob", "reject", "over budget", "corr-bob")]
    assert all(d["decided_at"] for d in detail["decisions"])
    assert [(e["type"], e["actor"], e["correlation_id"]) for e in detail["history"]] == [
        ("approval.requested.v1", "service:approvals", request.correlation_id),
        ("approval.decided.v1", "user:ann", "corr-ann"),
        ("approval.decided.v1", "user:bob", "corr-bob"),
        ("approval.rejected.v1", "user:bob", "corr-bob"),
    ]
    assert detail["history"][3]["reason"] == "over budget"
    assert detail["maker"] == "mia" and detail["resolved_at"] is not None


async def test_the_payment_timeline_includes_its_approval(http, as_, sessionmaker, settings, tenant):
    request = await open_payment(sessionmaker, settings, tenant, amount=100)
    part = (await http.get("/internal/timeline", params={"payment_id": request.subject_id},
                           headers=as_("gateway"))).json()
    assert [(e["service"], e["type"], e["actor"]) for e in part["events"]] == [
        ("approvals", "approval.granted.v1", "system:policy")]
