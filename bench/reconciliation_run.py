"""Reconciliation benchmark: upload + three-way run of N statement lines against N
payments and N ledger postings in the read model, on the embedded PostgreSQL, for each
size of a series (default 10k, 100k, 1M); then the same matching done by DuckDB and by
pandas on the same data, in the same run, as ratios.

    .venv/bin/python -m bench.reconciliation_run [--sizes 10000,100000,1000000] [--no-compare]

What is measured, per size (a fresh database each):
  upload   POST /v1/reconciliation/statements through the service's ASGI app (in process,
           no socket): the body streamed from a file, spooled, hashed, parsed, COPYed
  run      POST /v1/reconciliation/runs, then the worker's run: every pass, matches,
           breaks and their events, committed
  memory   peak RSS of this process (API + worker; sampled, and ru_maxrss) and peak
           unique memory (USS, sampled twice a second) of the PostgreSQL backends serving it
           (parallel workers included); shared buffers are not counted as the backends' own
  cpu      CPU seconds of this process and of those backends over upload + run: unlike
           wall time, barely moved by other work on the machine
The read model is loaded with COPY beforehand (not timed): it is what the consumers
build from events, benchmarked by bench/reconciliation_ingest.py.

Injected differences (per 1,000 payments): 1 missing in the statement, 1 missing in the
ledger, 1 statement amount off by a cent, 1 ledger amount off, 0.5 duplicate lines, 0.5
lines in the wrong currency, and 1 line naming no payment: every break type, known counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import asyncpg
import httpx
import psutil

from clearhouse.embedded import EmbeddedPostgres, free_port
from clearhouse.provision import provision_database
from shared import migrate
from shared.auth import generate_keypair, sign_internal_token
from shared.db import make_engine, make_sessionmaker, plain_url

TENANT = "bench"
VALUE_DATE = date(2026, 3, 2)
HEADER = "booking_date,value_date,credit_debit,amount,currency,reference,type,processor_reference\n"


@dataclass
class Expected:
    lines: int = 0
    matched: int = 0
    breaks: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, n: int = 1) -> None:
        self.breaks[kind] = self.breaks.get(kind, 0) + n


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _money(minor: int) -> str:
    return f"{minor // 100}.{minor % 100:02d}"


def generate(n: int, workdir: Path) -> Expected:
    """payments.tsv, ledger.tsv (COPY text for the read model) and statement.csv, with
    known differences injected; returns what a correct run must find."""
    rng = random.Random(n)
    expected = Expected()
    posted_at = datetime(2026, 3, 2, 12, tzinfo=timezone.utc).isoformat()
    with open(workdir / "payments.tsv", "w") as payments, open(workdir / "ledger.tsv", "w") as ledger, \
            open(workdir / "statement.csv", "w") as statement:
        statement.write(HEADER)
        for i in range(n):
            payment_id = _uuid(rng)
            amount = rng.randint(100, 5_000_000)
            payments.write(f"{TENANT}\t{payment_id}\t{amount}\tEUR\tacct_{i % 97}\tsettled\t{i + 1}\t{VALUE_DATE}\t0\n")
            kind = i % 1000
            if kind != 2:  # 2: the ledger never posted it
                ledger_amount = amount + 7 if kind == 4 else amount
                ledger.write(f"{TENANT}\t{_uuid(rng)}\tEUR\t{payment_id}\t{ledger_amount}\thold_posted\t{posted_at}\n")
            else:
                expected.add("missing_in_ledger")
            if kind == 4:
                expected.add("amount_mismatch")  # ledger side
            if kind == 1:
                expected.add("missing_in_statement")
                continue
            line_amount, currency = amount, "EUR"
            if kind == 3:
                line_amount += 1
                expected.add("amount_mismatch")
            if i % 2000 == 6:
                currency = "USD"
                expected.add("currency_mismatch")
            statement.write(f"{VALUE_DATE},{VALUE_DATE},DBIT,{_money(line_amount)},{currency},{payment_id},payout,"
                            f"po_{i:024x}\n")
            expected.lines += 1
            if i % 2000 == 5:
                statement.write(f"{VALUE_DATE},{VALUE_DATE},DBIT,{_money(line_amount)},{currency},{payment_id},"
                                f"payout,po_dup_{i:020x}\n")
                expected.lines += 1
                expected.add("duplicate")
            if kind not in (2, 3, 4) and i % 2000 != 6:
                expected.matched += 1
            if kind == 7:
                statement.write(f"{VALUE_DATE},{VALUE_DATE},DBIT,{_money(amount)},EUR,{_uuid(rng)},payout,"
                                f"po_unknown_{i:016x}\n")
                expected.lines += 1
                expected.add("missing_in_payments")
    return expected


class Sampler:
    """Peak memory while the measured work runs: this process's RSS and the summed USS of
    the PostgreSQL processes serving the benchmark database."""

    def __init__(self, database: str, interval: float = 0.1) -> None:
        self.database, self.interval = database, interval
        self.own_peak = 0
        self.pg_peak = 0
        self.pg_rss_peak = 0
        self.own_cpu = 0.0
        self._pg_cpu: dict[int, tuple[float, float]] = {}  # pid -> (first seen, last seen) CPU seconds
        self._own_cpu_start = time.process_time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _backends(self) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter(["name", "cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if cmdline.startswith("postgres:") and (f" {self.database} " in cmdline or "parallel worker" in cmdline):
                found.append(process)
        return found

    def _run(self) -> None:
        me = psutil.Process()
        rounds = 0
        while not self._stop.is_set():
            self.own_peak = max(self.own_peak, me.memory_info().rss)
            # USS reads /proc/<pid>/smaps of each backend: costly enough to slow what it
            # measures, so twice a second; RSS and CPU ten times a second.
            full = rounds % 5 == 4
            rounds += 1
            uss = rss = 0
            for process in self._backends():
                try:
                    info = process.memory_full_info() if full else process.memory_info()
                    uss += info.uss if full else 0
                    rss += info.rss
                    times = process.cpu_times()
                    spent = times.user + times.system
                    first = self._pg_cpu.get(process.pid, (spent, spent))[0]
                    self._pg_cpu[process.pid] = (first, spent)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.pg_rss_peak = max(self.pg_rss_peak, rss)
            if full:
                self.pg_peak = max(self.pg_peak, uss)
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.own_cpu = time.process_time() - self._own_cpu_start

    @property
    def pg_cpu(self) -> float:
        """CPU seconds of the backends (and parallel workers) seen while sampling; a worker
        that lived less than a sampling interval is missed, so this is a lower bound."""
        return sum(last - first for first, last in self._pg_cpu.values())


async def load_read_model(owner_url: str, workdir: Path) -> None:
    conn = await asyncpg.connect(plain_url(owner_url))
    try:
        with open(workdir / "payments.tsv", "rb") as payments:
            await conn.copy_to_table("rm_payments", source=payments, columns=[
                "tenant_id", "payment_id", "amount", "currency", "debit_account_id", "status", "status_seq",
                "value_date", "refunded_amount"])
        with open(workdir / "ledger.tsv", "rb") as ledger:
            await conn.copy_to_table("rm_ledger_postings", source=ledger, columns=[
                "tenant_id", "transaction_id", "currency", "payment_id", "amount", "kind", "posted_at"])
        # The totals, as the consumer keeps them posting by posting.
        await conn.execute("""
            INSERT INTO rm_ledger_totals (tenant_id, payment_id, currency, amount, postings, reversals, value_date)
            SELECT tenant_id, payment_id, min(currency), sum(amount), count(*), 0,
                   min((posted_at AT TIME ZONE 'UTC')::date)
            FROM rm_ledger_postings GROUP BY tenant_id, payment_id""")
        await conn.execute("VACUUM ANALYZE rm_payments")
        await conn.execute("VACUUM ANALYZE rm_ledger_postings")
        await conn.execute("VACUUM ANALYZE rm_ledger_totals")
    finally:
        await conn.close()


async def measure(pg: EmbeddedPostgres, n: int, root: Path) -> dict:
    from services.reconciliation import jobs
    from services.reconciliation.api import MIGRATIONS, create_app
    from services.reconciliation.settings import Settings

    workdir = root / f"n{n}"
    workdir.mkdir()
    started = time.perf_counter()
    expected = generate(n, workdir)
    generated = time.perf_counter() - started
    name = f"bench_recon_{n}"
    db = await provision_database(pg.url(), name)
    await asyncio.to_thread(migrate.upgrade, MIGRATIONS, db.owner_url, db.app_role)
    await load_read_model(db.owner_url, workdir)

    private_pem, public_pem = generate_keypair()
    settings = Settings(database_url=db.app_url, internal_token_public_key=public_pem, db_pool_size=4,
                        kafka_bootstrap_servers="127.0.0.1:1", log_level="WARNING")
    app = create_app(settings)
    engine = make_engine(db.app_url, pool_size=4)
    sessionmaker = make_sessionmaker(engine)

    def auth(content_type: str | None = None) -> dict[str, str]:
        token = sign_internal_token(private_pem, tenant_id=TENANT, principal="bench",
                                    scopes=["reconciliation:read", "reconciliation:write"],
                                    request_id=uuid.uuid4().hex, ttl_s=600)
        found = {"Authorization": f"Bearer {token}"}
        if content_type:
            found["Content-Type"] = content_type
        return found

    async def body():
        with open(workdir / "statement.csv", "rb") as f:
            while chunk := f.read(256 * 1024):
                yield chunk

    size = (workdir / "statement.csv").stat().st_size
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://recon", timeout=600) as client:
        with Sampler(name) as sampler:
            t0 = time.perf_counter()
            uploaded = await client.post("/v1/reconciliation/statements", content=body(), headers=auth("text/csv"))
            t1 = time.perf_counter()
            assert uploaded.status_code == 201, uploaded.text
            created = await client.post("/v1/reconciliation/runs",
                                        json={"statement_id": uploaded.json()["id"]}, headers=auth())
            assert created.status_code == 202, created.text
            await jobs.run_once(sessionmaker, settings=settings)
            t2 = time.perf_counter()
        run = (await client.get(f"/v1/reconciliation/runs/{created.json()['id']}", headers=auth())).json()
        found = {}
        cursor = None
        while True:
            page = (await client.get("/v1/reconciliation/breaks", headers=auth(),
                                     params={"limit": 1000, **({"cursor": cursor} if cursor else {})})).json()
            for item in page["data"]:
                found[item["type"]] = found.get(item["type"], 0) + 1
            cursor = page["next_cursor"]
            if not cursor:
                break
    await engine.dispose()
    await app.state.engine.dispose()
    correct = (run["status"] == "completed" and run["lines"] == expected.lines and run["matched"] == expected.matched
               and found == expected.breaks)
    return {
        "n": n, "lines": run["lines"], "file_mb": round(size / 2**20, 1), "generate_s": round(generated, 1),
        "upload_s": round(t1 - t0, 2), "run_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
        "stages": run["stage_seconds"], "matched": run["matched"], "breaks": found, "expected_breaks": expected.breaks,
        "correct": correct, "py_peak_rss_mb": round(sampler.own_peak / 2**20),
        "py_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "pg_peak_uss_mb": round(sampler.pg_peak / 2**20), "pg_peak_rss_mb": round(sampler.pg_rss_peak / 2**20),
        "py_cpu_s": round(sampler.own_cpu, 1), "pg_cpu_s": round(sampler.pg_cpu, 1),
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "workdir": str(workdir),
    }


# ── the same matching, by DuckDB and by pandas (run in a child process each) ──────────

DUCKDB_SQL = """
CREATE TABLE payments AS SELECT * FROM read_csv('{dir}/payments.tsv', delim='\t', header=false, columns={{
    'tenant_id': 'VARCHAR', 'payment_id': 'UUID', 'amount': 'BIGINT', 'currency': 'VARCHAR',
    'debit_account_id': 'VARCHAR', 'status': 'VARCHAR', 'status_seq': 'BIGINT', 'value_date': 'DATE',
    'refunded_amount': 'BIGINT'}});
CREATE TABLE ledger AS SELECT tenant_id, payment_id, min(currency) AS currency, sum(amount) AS amount,
    count(*) AS postings FROM read_csv('{dir}/ledger.tsv', delim='\t', header=false, columns={{
    'tenant_id': 'VARCHAR', 'transaction_id': 'UUID', 'currency': 'VARCHAR', 'payment_id': 'UUID',
    'amount': 'BIGINT', 'kind': 'VARCHAR', 'posted_at': 'TIMESTAMPTZ'}}) GROUP BY ALL;
CREATE TABLE lines AS SELECT row_number() OVER () AS line_no, value_date, credit_debit AS direction,
    CAST(round(amount * 100) AS BIGINT) AS amount, currency, TRY_CAST(reference AS UUID) AS ref
    FROM read_csv('{dir}/statement.csv', header=true, columns={{'booking_date': 'DATE', 'value_date': 'DATE',
    'credit_debit': 'VARCHAR', 'amount': 'DECIMAL(18,2)', 'currency': 'VARCHAR', 'reference': 'VARCHAR',
    'type': 'VARCHAR', 'processor_reference': 'VARCHAR'}});
"""

DUCKDB_MATCH = """
CREATE TABLE keyed AS
SELECT l.*, p.payment_id, p.amount AS p_amount, p.currency AS p_currency,
       CASE WHEN p.payment_id IS NULL THEN 'missing_in_payments'
            WHEN l.currency <> p.currency THEN 'currency_mismatch'
            WHEN l.amount <> p.amount THEN 'amount_mismatch' ELSE 'exact' END AS outcome,
       row_number() OVER (PARTITION BY l.ref ORDER BY l.line_no) AS rank
FROM lines l LEFT JOIN payments p ON p.payment_id = l.ref;
CREATE TABLE matched AS
SELECT k.line_no, k.payment_id, g.amount IS NOT NULL AND g.amount = k.p_amount AND g.currency = k.p_currency AS agrees
FROM keyed k LEFT JOIN ledger g ON g.payment_id = k.payment_id WHERE k.outcome = 'exact' AND k.rank = 1;
SELECT 'matched', count(*) FILTER (WHERE agrees) FROM matched
UNION ALL SELECT CASE WHEN rank > 1 THEN 'duplicate' ELSE outcome END, count(*) FROM keyed
    WHERE outcome <> 'exact' OR rank > 1 GROUP BY 1
UNION ALL SELECT 'missing_in_statement', count(*) FROM payments p
    WHERE p.value_date = DATE '2026-03-02' AND NOT EXISTS (SELECT 1 FROM keyed k WHERE k.payment_id = p.payment_id)
UNION ALL SELECT CASE WHEN g.payment_id IS NULL THEN 'missing_in_ledger' ELSE 'amount_mismatch' END, count(*)
    FROM payments p LEFT JOIN ledger g ON g.payment_id = p.payment_id
    WHERE g.payment_id IS NULL OR g.amount <> p.amount GROUP BY 1;
"""


def compare_duckdb(workdir: str) -> dict:
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 2")
    t0 = time.perf_counter()
    con.execute(DUCKDB_SQL.format(dir=workdir))
    t1 = time.perf_counter()
    counts: dict[str, int] = {}
    for statement in DUCKDB_MATCH.strip().split(";\n"):
        result = con.execute(statement).fetchall() if statement.strip() else []
    for kind, n in result:
        counts[kind] = counts.get(kind, 0) + n
    t2 = time.perf_counter()
    return {"load_s": round(t1 - t0, 2), "match_s": round(t2 - t1, 2), "counts": counts}


def compare_pandas(workdir: str) -> dict:
    import pandas as pd

    t0 = time.perf_counter()
    payments = pd.read_csv(f"{workdir}/payments.tsv", sep="\t", header=None, usecols=[1, 2, 3, 7],
                           names=["tenant_id", "payment_id", "amount", "currency", "a", "s", "q", "value_date", "r"],
                           dtype={"payment_id": str, "amount": "int64", "currency": str, "value_date": str})
    ledger = pd.read_csv(f"{workdir}/ledger.tsv", sep="\t", header=None, usecols=[2, 3, 4],
                         names=["t", "x", "currency", "payment_id", "amount", "k", "p"],
                         dtype={"payment_id": str, "amount": "int64", "currency": str})
    lines = pd.read_csv(f"{workdir}/statement.csv", usecols=["value_date", "credit_debit", "amount", "currency",
                                                             "reference"], dtype={"amount": str, "reference": str})
    parts = lines["amount"].str.split(".", expand=True)
    lines["amount"] = parts[0].astype("int64") * 100 + parts[1].str.ljust(2, "0").astype("int64")
    lines["line_no"] = range(1, len(lines) + 1)
    t1 = time.perf_counter()
    ledger = ledger.groupby("payment_id", as_index=False).agg(l_amount=("amount", "sum"), l_currency=("currency", "min"))
    keyed = lines.merge(payments, how="left", left_on="reference", right_on="payment_id", suffixes=("", "_p"))
    keyed["rank"] = keyed.groupby("reference").cumcount() + 1
    outcome = pd.Series("exact", index=keyed.index)
    outcome[keyed["amount"] != keyed["amount_p"]] = "amount_mismatch"
    outcome[keyed["currency"] != keyed["currency_p"]] = "currency_mismatch"
    outcome[keyed["payment_id"].isna()] = "missing_in_payments"
    outcome[(keyed["rank"] > 1) & keyed["payment_id"].notna()] = "duplicate"
    keyed["outcome"] = outcome
    counts = keyed.loc[keyed["outcome"] != "exact", "outcome"].value_counts().to_dict()
    matched = keyed[keyed["outcome"] == "exact"].merge(ledger, how="left", on="payment_id")
    counts["matched"] = int(((matched["l_amount"] == matched["amount_p"])
                             & (matched["l_currency"] == matched["currency_p"])).sum())
    missing = ~payments["payment_id"].isin(keyed["payment_id"].dropna())
    counts["missing_in_statement"] = int(missing.sum())
    both = payments.merge(ledger, how="left", on="payment_id")
    counts["missing_in_ledger"] = int(both["l_amount"].isna().sum())
    counts["amount_mismatch"] = counts.get("amount_mismatch", 0) + int(
        (both["l_amount"].notna() & (both["l_amount"] != both["amount"])).sum())
    t2 = time.perf_counter()
    return {"load_s": round(t1 - t0, 2), "match_s": round(t2 - t1, 2), "counts": {k: int(v) for k, v in counts.items()}}


def compare_in_child(engine: str, workdir: str) -> dict:
    completed = subprocess.run([sys.executable, "-m", "bench.reconciliation_run", "--compare", engine, workdir],
                               capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


async def main(sizes: list[int], compare: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="clearhouse-bench-recon-"))
    pg = EmbeddedPostgres(root / "pg", free_port())
    results = []
    try:
        pg.start()
        for n in sizes:
            result = await measure(pg, n, root)
            if compare:
                result["duckdb"] = compare_in_child("duckdb", result["workdir"])
                result["pandas"] = compare_in_child("pandas", result["workdir"])
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "workdir"}), flush=True)
            shutil.rmtree(result["workdir"], ignore_errors=True)
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"{'lines':>9} {'upload s':>9} {'run s':>7} {'total s':>8} {'py cpu':>7} {'pg cpu':>7} {'py MB':>6} "
          f"{'pg MB':>6} {'duckdb s':>9} {'pandas s':>9} {'pg/duckdb':>10} {'pg/pandas':>10} {'load':>5} correct")
    for r in results:
        duck = r.get("duckdb", {})
        pand = r.get("pandas", {})
        duck_s = duck.get("load_s", 0) + duck.get("match_s", 0)
        pand_s = pand.get("load_s", 0) + pand.get("match_s", 0)
        print(f"{r['lines']:>9,} {r['upload_s']:>9.2f} {r['run_s']:>7.2f} {r['total_s']:>8.2f} {r['py_cpu_s']:>7.1f} "
              f"{r['pg_cpu_s']:>7.1f} {max(r['py_peak_rss_mb'], r['py_maxrss_mb']):>6} {r['pg_peak_uss_mb']:>6} "
              f"{duck_s:>9.2f} {pand_s:>9.2f} {r['total_s'] / duck_s if duck_s else 0:>10.1f} "
              f"{r['total_s'] / pand_s if pand_s else 0:>10.1f} {r['load_avg_1m']:>5} {r['correct']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--no-compare", action="store_true")
    parser.add_argument("--compare", nargs=2, metavar=("ENGINE", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare:
        engine, workdir = args.compare
        print(json.dumps(compare_duckdb(workdir) if engine == "duckdb" else compare_pandas(workdir)))
    else:
        os.environ.setdefault("LOG_LEVEL", "WARNING")
        asyncio.run(main([int(s) for s in args.sizes.split(",")], compare=not args.no_compare))
