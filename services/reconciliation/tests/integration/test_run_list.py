"""GET /v1/reconciliation/runs: the tenant's runs newest first, a page at a time, with
their progress; another tenant's runs are never listed (the console's run list)."""

from __future__ import annotations

import uuid

from services.reconciliation.tests.integration.harness import headers, sandbox_csv, upload


async def _run(client, private_pem, tenant) -> str:
    statement = await upload(client, private_pem, tenant, sandbox_csv([(str(uuid.uuid4()), 100, "EUR", "2026-03-02")]))
    created = await client.post("/v1/reconciliation/runs", json={"statement_id": statement.json()["id"]},
                                headers=headers(private_pem, tenant=tenant))
    assert created.status_code == 202, created.text
    return created.json()["id"]


async def test_runs_are_listed_newest_first_per_tenant_in_pages(client, private_pem, tenant):
    made = [await _run(client, private_pem, tenant) for _ in range(3)]
    other = await _run(client, private_pem, f"{tenant}-other")
    first = await client.get("/v1/reconciliation/runs", params={"limit": 2},
                             headers=headers(private_pem, tenant=tenant))
    assert first.status_code == 200, first.text
    page = first.json()
    assert [r["id"] for r in page["data"]] == [made[2], made[1]] and page["next_cursor"]
    assert {"status", "stage", "lines", "matched", "breaks"} <= page["data"][0].keys()
    rest = await client.get("/v1/reconciliation/runs", params={"limit": 2, "cursor": page["next_cursor"]},
                            headers=headers(private_pem, tenant=tenant))
    assert [r["id"] for r in rest.json()["data"]] == [made[0]] and rest.json()["next_cursor"] is None
    queued = await client.get("/v1/reconciliation/runs", params={"status": "queued"},
                              headers=headers(private_pem, tenant=tenant))
    assert other not in [r["id"] for r in queued.json()["data"]]
    assert {r["status"] for r in queued.json()["data"]} == {"queued"}


async def test_a_bad_cursor_or_status_is_a_problem_not_a_500(client, private_pem, tenant):
    bad_cursor = await client.get("/v1/reconciliation/runs", params={"cursor": "nope"},
                                  headers=headers(private_pem, tenant=tenant))
    assert bad_cursor.status_code == 400 and bad_cursor.json()["code"] == "invalid_cursor"
    bad_status = await client.get("/v1/reconciliation/runs", params={"status": "sleeping"},
                                  headers=headers(private_pem, tenant=tenant))
    assert bad_status.status_code == 422
