"""Console pages: how long a person waits for each page of the operations console, with a
realistic inbox (50 pending approvals), on a running `clearhouse up`.

    bin/clearhouse up                                  # in another terminal
    .venv/bin/python -m bench.console_pages [--home .clearhouse] [--pending 50] [--rounds 40]

Sequential requests (one person, four pages a second), measured from request to the last byte of the page, as
a browser would wait for the HTML; the page's CSS and script are cached after the first
view. Each page is server-rendered from concurrent calls to the services through the
gateway's internal-token path, so this is the whole cost: session check, upstream calls,
rendering.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("CLEARHOUSE_HOME", ROOT / ".clearhouse")))
    parser.add_argument("--pending", type=int, default=50, help="payments to create (at least 1)")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    state = json.loads((args.home / "state.json").read_text())
    base = f"http://127.0.0.1:{state['ports']['gateway']}"
    demo = (args.home / "keys" / "demo-api-key").read_text().strip()
    made = subprocess.run([sys.executable, "-m", "clearhouse", "keys", "create", "--tenant", "demo", "--principal",
                           f"bench-checker-{uuid.uuid4().hex[:6]}", "--scopes",
                           "approvals:read,approvals:decide,payments:read,reconciliation:read,reconciliation:write",
                           "--json"], cwd=ROOT, env={**os.environ, "CLEARHOUSE_HOME": str(args.home)},
                          capture_output=True, text=True, check=True)
    checker = json.loads(made.stdout)["key"]

    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {demo}"}, timeout=30)

    def post(path: str, body: dict) -> dict:
        key = uuid.uuid4().hex
        while (response := api.post(path, json=body, headers={"Idempotency-Key": key})).status_code == 429:
            time.sleep(float(response.headers.get("retry-after", "1")))  # the demo key's rate limit
        response.raise_for_status()
        return response.json()

    funding = post("/v1/ledger/accounts", {"name": "bench funding", "currency": "EUR", "normal_balance": "debit",
                                           "allow_negative": True})["id"]
    customer = post("/v1/ledger/accounts", {"name": "bench customer", "currency": "EUR",
                                            "normal_balance": "credit"})["id"]
    post("/v1/ledger/transactions", {"entries": [{"account_id": funding, "direction": "debit", "amount": 10**10},
                                                 {"account_id": customer, "direction": "credit", "amount": 10**10}]})
    payment = None
    for index in range(args.pending):
        payment = post("/v1/payments", {"amount": 150_000 + index, "currency": "EUR", "debit_account_id": customer,
                                        "payee": {"name": "Jane Doe", "iban": "DE89370400440532013000"},
                                        "reference": f"bench {index}"})
    deadline = time.monotonic() + 60
    while len(api.get("/v1/approvals", params={"status": "pending", "limit": 100}).json()["data"]) < args.pending:
        assert time.monotonic() < deadline, "the approval requests did not appear"
        time.sleep(0.5)

    browser = httpx.Client(base_url=base, timeout=30)
    sign_in = browser.get("/console/sign-in")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', sign_in.text).group(1)
    assert browser.post("/console/sign-in", data={"csrf_token": csrf, "api_key": checker}).status_code == 303
    pages = {"approvals inbox": "/console/approvals", "inbox poll (304)": "/console/approvals/rows",
             "payment + timeline": f"/console/payments/{payment['id']}", "payments list": "/console/payments",
             "reconciliation": "/console/reconciliation", "health (13 processes)": "/console/health"}
    etag = browser.get("/console/approvals/rows").headers["etag"]
    print(f"{args.pending} pending approvals; {args.rounds} sequential requests per page\n")
    print(f"{'page':<24}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'bytes':>9}")
    for name, path in pages.items():
        headers = {"If-None-Match": etag, "X-Console-Poll": "1"} if "poll" in name else {}
        timings, size = [], 0
        for _ in range(args.rounds):
            time.sleep(0.25)  # a person's pace, well inside the key's rate limit (pages make 1-3 calls)
            started = time.perf_counter()
            response = browser.get(path, headers=headers)
            timings.append((time.perf_counter() - started) * 1000)
            assert response.status_code in (200, 304), (path, response.status_code)
            size = len(response.content)
        print(f"{name:<24}{statistics.median(timings):>9.1f}{percentile(timings, 0.95):>9.1f}"
              f"{max(timings):>9.1f}{size:>9}")


if __name__ == "__main__":
    main()
