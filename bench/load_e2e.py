"""End-to-end load: payments through the gateway on the whole platform `clearhouse up`
starts (embedded PostgreSQL, Tansu, every api/relay/consumer process, the sandbox),
with auto-approval (amounts below the default 1,000.00 threshold) and instant settlement
(sandbox delays 0). Open loop: payments are sent on a fixed schedule whatever the answers
do, so a slow platform cannot slow the load down and hide its own queueing.

    .venv/bin/python -m bench.load_e2e [--rate 50] [--seconds 30] [--ramp 5,10,20,30,40,75,100,150]

    POST /v1/payments ─▶ created ─▶ approved ─▶ hold placed ─▶ submitted ─▶ settled ─▶ hold posted
    scheduled send     (payments)                (ledger)      (sandbox)   (webhook)   (ledger)

Latencies count from each payment's scheduled send time to the `payment.settled.v1` event
in the payments event log and the `ledger.hold.posted.v1` event in the ledger's (the
events are read from the databases after each step, so measuring adds no load). The ramp
runs ascending rates, each on a quiet platform (the previous backlog drained), until one
no longer keeps up: the sustained rate is the highest step whose payments were all posted
within the drain window with p99 ≤ 5 s; the headline rate is measured either way. CPU (share of one
core) and RSS per process come from psutil over the `up` process tree; the slowest
payments' traces are read from `$CLEARHOUSE_HOME/traces` with `clearhouse.traceview`.
The load generator runs on the same two cores (raw sockets, as bench.gateway_harness, to
keep its own CPU small).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import orjson
import psutil

from bench._platform import percentile
from bench.gateway_harness import Connection, request_bytes
from clearhouse.traceview import Span, load_spans

ROOT = Path(__file__).resolve().parent.parent
PLATFORM_ENV = {
    "SANDBOX_PROCESSING_DELAY_S": "0", "SANDBOX_SETTLE_DELAY_S": "0",  # instant settlement
    # The load is one API key: the per-key rate limit (20/s by default) must not be what is measured.
    "RATE_LIMIT_PER_S": "1000000", "RATE_LIMIT_BURST": "1000000",
    "LOG_LEVEL": "WARNING",
}
ACCOUNTS = 32  # payments spread over customer accounts, as many customers would
AMOUNT = 1_050  # 10.50 EUR: auto-approved; no sandbox failure trigger (…13, …14, …22)
KEEP_UP_P99_S = 5.0
DRAIN_S = 60.0


@dataclass
class Running:
    proc: subprocess.Popen
    home: Path
    gateway_port: int
    key: str
    pg_url: str


def start_platform(home: Path) -> Running:
    log = open(home.parent / "up.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "clearhouse", "up"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "CLEARHOUSE_HOME": str(home), **PLATFORM_ENV}, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        text = (home.parent / "up.log").read_text()
        if "Ctrl-C stops everything" in text:
            port = int(re.search(r"gateway URL\s+http://127\.0\.0\.1:(\d+)", text)[1])
            key = re.search(r"demo API key\s+(\S+)", text)[1]
            pg = int(re.search(r"embedded, data in .*, port (\d+)", text)[1])
            return Running(proc, home, port, key, f"postgresql://postgres@127.0.0.1:{pg}")
        if proc.poll() is not None:
            raise SystemExit(f"clearhouse up exited ({proc.returncode}):\n{text}")
        time.sleep(0.5)
    raise SystemExit("clearhouse up was not ready within 240 s")


def stop_platform(running: Running) -> None:
    running.proc.send_signal(signal.SIGTERM)  # SIGINT may be ignored when run in the background
    try:
        running.proc.wait(90)
    except subprocess.TimeoutExpired:
        running.proc.kill()


async def customer_accounts(base: str, key: str) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        async def post(path: str, body: dict) -> dict:
            response = await http.post(path, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
            assert response.status_code == 201, response.text
            return response.json()

        funding = (await post("/v1/ledger/accounts", {"name": "load funding", "currency": "EUR",
                                                      "normal_balance": "debit", "allow_negative": True}))["id"]
        accounts = []
        for n in range(ACCOUNTS):
            account = (await post("/v1/ledger/accounts", {"name": f"load customer {n}", "currency": "EUR",
                                                          "normal_balance": "credit"}))["id"]
            await post("/v1/ledger/transactions", {"entries": [
                {"account_id": funding, "direction": "debit", "amount": 10**12},
                {"account_id": account, "direction": "credit", "amount": 10**12}]})
            accounts.append(account)
        return accounts


@dataclass
class Step:
    rate: float
    seconds: float
    sent: dict[str, float] = field(default_factory=dict)  # payment id -> scheduled send (wall clock)
    create_latency: list[float] = field(default_factory=list)  # scheduled send -> 201
    errors: dict[int, int] = field(default_factory=dict)
    settled: dict[str, float] = field(default_factory=dict)  # payment id -> seconds after send
    posted: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> share of one core
    rss: dict[str, float] = field(default_factory=dict)  # process -> MiB
    drained_s: float = 0.0

    @property
    def kept_up(self) -> bool:
        return (not self.errors and len(self.posted) == len(self.sent)
                and percentile(list(self.posted.values()), 99) <= KEEP_UP_P99_S)


async def send_payments(step: Step, port: int, key: str, accounts: list[str]) -> None:
    idle: list[Connection] = []
    total = int(step.rate * step.seconds)
    start_mono, start_wall = time.perf_counter() + 0.1, time.time() + 0.1

    async def one(i: int) -> None:
        scheduled = start_mono + i / step.rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        body = orjson.dumps({"amount": AMOUNT, "currency": "EUR", "debit_account_id": accounts[i % len(accounts)],
                             "payee": {"name": "Load Payee", "iban": "DE89370400440532013000"},
                             "reference": f"load {step.rate:g}/s #{i}"})
        request = request_bytes("POST", "/v1/payments", {
            "Authorization": f"Bearer {key}", "Content-Type": "application/json",
            "Idempotency-Key": uuid.uuid4().hex}, body)
        conn = idle.pop() if idle else await Connection.open(port)
        try:
            status, answer = await conn.exchange(request)
        except (OSError, asyncio.IncompleteReadError):
            step.errors[0] = step.errors.get(0, 0) + 1
            return
        idle.append(conn)
        if status == 201:
            step.create_latency.append(time.perf_counter() - scheduled)
            step.sent[orjson.loads(answer)["id"]] = start_wall + i / step.rate
        else:
            step.errors[status] = step.errors.get(status, 0) + 1
            if sum(step.errors.values()) == 1:
                print(f"    unexpected {status}: {answer[:300]!r}", flush=True)

    await asyncio.gather(*(one(i) for i in range(total)))
    for conn in idle:
        conn.close()


async def collect_outcomes(step: Step, pg_url: str) -> None:
    """Wait (up to DRAIN_S) until every payment of the step is posted in the ledger, then
    record settled and posted times from the two event logs."""
    ids = list(step.sent)
    payments = await asyncpg.connect(f"{pg_url}/clearhouse_payments")
    ledger = await asyncpg.connect(f"{pg_url}/clearhouse_ledger")
    started = time.monotonic()
    try:
        while True:
            posted = await ledger.fetch(
                "SELECT payload->>'payment_id' AS id, extract(epoch FROM occurred_at) AS at FROM events "
                "WHERE type = 'ledger.hold.posted.v1' AND payload->>'payment_id' = ANY($1::text[])", ids)
            if len(posted) >= len(ids) or time.monotonic() - started > DRAIN_S:
                break
            await asyncio.sleep(0.5)
        step.drained_s = time.monotonic() - started
        settled = await payments.fetch(
            "SELECT aggregate_id AS id, extract(epoch FROM occurred_at) AS at FROM events "
            "WHERE type = 'payment.settled.v1' AND aggregate_id = ANY($1::text[])", ids)
    finally:
        await payments.close()
        await ledger.close()
    step.posted = {r["id"]: float(r["at"]) - step.sent[r["id"]] for r in posted}
    step.settled = {r["id"]: float(r["at"]) - step.sent[r["id"]] for r in settled}


# --- CPU and memory per process ----------------------------------------------------------------


def process_name(proc: psutil.Process) -> str:
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return "?"
    text = " ".join(argv)
    if match := re.search(r"clearhouse serve (\w+) --role (\w+)", text):
        return f"{match[1]}-{match[2]}"
    if "clearhouse up" in text:
        return "up (supervisor)"
    if argv and ("postgres" in os.path.basename(argv[0]) or argv[0].startswith("postgres:")):
        return "postgres (all)"
    if "tansu" in text:
        return "broker (tansu)"
    return os.path.basename(argv[0]) if argv else "?"


class Sampler:
    """CPU seconds per named process over a window (processes summed by name: every
    PostgreSQL backend counts as postgres), and RSS at the end of it."""

    def __init__(self, root_pid: int, pg_data: Path) -> None:
        self.root = psutil.Process(root_pid)
        self.pg_data = str(pg_data)
        self.start: dict[int, tuple[str, float]] = {}
        self.t0 = 0.0

    def _tree(self) -> list[psutil.Process]:
        found = [self.root, *self.root.children(recursive=True)]
        # pg_ctl daemonizes the postmaster: it and its backends are not children of `up`.
        for proc in psutil.process_iter(["cmdline"]):
            if self.pg_data in " ".join(proc.info["cmdline"] or ()):
                found += [proc, *proc.children(recursive=True)]
        return list({p.pid: p for p in found}.values())

    def begin(self) -> None:
        self.t0 = time.monotonic()
        self.start = {}
        for proc in self._tree():
            try:
                times = proc.cpu_times()
                self.start[proc.pid] = (process_name(proc), times.user + times.system)
            except psutil.Error:
                pass

    def end(self, step: Step) -> None:
        wall = time.monotonic() - self.t0
        cpu: dict[str, float] = defaultdict(float)
        rss: dict[str, float] = defaultdict(float)
        for proc in self._tree():
            try:
                name = process_name(proc)
                times = proc.cpu_times()
                used = times.user + times.system - self.start.get(proc.pid, (name, 0.0))[1]
                cpu[name] += used / wall
                rss[name] += proc.memory_info().rss / 2**20
            except psutil.Error:
                pass
        step.cpu, step.rss = dict(cpu), dict(rss)


# --- where the time goes -------------------------------------------------------------------------


async def trace_ids(pg_url: str, payment_ids: list[str]) -> dict[str, set[str]]:
    """Every trace that wrote an event about each payment, in any service's log."""
    found: dict[str, set[str]] = defaultdict(set)
    for service in ("payments", "approvals", "ledger"):
        conn = await asyncpg.connect(f"{pg_url}/clearhouse_{service}")
        try:
            for row in await conn.fetch(
                    "SELECT payload->>'payment_id' AS id, traceparent FROM events "
                    "WHERE payload->>'payment_id' = ANY($1::text[]) AND traceparent IS NOT NULL", payment_ids):
                found[row["id"]].add(row["traceparent"].split("-")[1])
        finally:
            await conn.close()
    return found


def stages(spans: list[Span]) -> list[Span]:
    """The spans that mark a hop: a request served, a message published or processed, a
    call to another process, a job's round (a root span); statements are inside them."""
    return sorted((s for s in spans if s.kind in ("SERVER", "CONSUMER", "PRODUCER") or s.parent_span_id is None
                   or (s.kind == "CLIENT" and s.attributes.get("http.method"))), key=lambda s: s.start_ns)


def breakdown(step: Step, spans_by_trace: dict[str, list[Span]], traces: dict[str, set[str]], count: int) -> str:
    slowest = sorted(step.posted, key=step.posted.__getitem__, reverse=True)[:count]
    busy_total: dict[str, float] = defaultdict(float)
    lines = []
    for pid in slowest:
        spans = [s for t in traces.get(pid, ()) for s in spans_by_trace.get(t, [])]
        sent_ns = int(step.sent[pid] * 1e9)
        lines.append(f"  payment {pid}: settled +{step.settled.get(pid, float('nan')) * 1000:.0f} ms, "
                     f"posted +{step.posted[pid] * 1000:.0f} ms, "
                     f"{len(spans)} spans in {len(traces.get(pid, ()))} traces")
        for span in stages(spans):
            where = f"{span.service.removeprefix('clearhouse-')}/{span.role or '?'}"
            lines.append(f"    +{(span.start_ns - sent_ns) / 1e6:7.1f} ms {span.duration_ms:7.1f} ms  "
                         f"{where:<24} {span.kind:<8} {span.name[:60]}")
            if span.kind in ("SERVER", "CONSUMER"):
                busy_total[f"{where} {span.kind.lower()}"] += span.duration_ms
    total = sum(step.posted[pid] for pid in slowest) * 1000
    summary = [f"  summed over the {len(slowest)} slowest ({total:.0f} ms end to end in all):"]
    for where, ms in sorted(busy_total.items(), key=lambda kv: -kv[1]):
        summary.append(f"    {ms:8.1f} ms  {ms / total * 100:5.1f} %  in {where} spans")
    summary.append(f"    {total - sum(busy_total.values()):8.1f} ms  "
                   f"{(total - sum(busy_total.values())) / total * 100:5.1f} %  between them (outbox, broker, "
                   f"consumer polling, queueing for a worker)")
    return "\n".join(summary + lines)


# --- the run ----------------------------------------------------------------------------------


def report(step: Step) -> str:
    posted, settled = list(step.posted.values()), list(step.settled.values())

    def ms(values: list[float], p: float) -> str:
        return f"{percentile(values, p) * 1000:.0f}" if values else "-"

    return (f"  {step.rate:g}/s for {step.seconds:g} s: {len(step.sent)} created (errors {step.errors or 'none'}), "
            f"{len(settled)} settled, {len(posted)} posted (drained in {step.drained_s:.1f} s)\n"
            f"    send→201     p50 {ms(step.create_latency, 50)} ms  p99 {ms(step.create_latency, 99)} ms\n"
            f"    send→settled p50 {ms(settled, 50)} ms  p99 {ms(settled, 99)} ms\n"
            f"    send→posted  p50 {ms(posted, 50)} ms  p99 {ms(posted, 99)} ms  "
            f"→ {'kept up' if step.kept_up else 'did NOT keep up'}")


def resources(step: Step) -> str:
    rows = sorted(step.cpu, key=lambda n: -step.cpu[n])
    return "\n".join(f"    {name:<28} CPU {step.cpu[name] * 100:6.1f} %  RSS {step.rss.get(name, 0):7.1f} MiB"
                     for name in rows)


async def quiesce(pg_url: str, timeout: float = 300) -> None:
    """Wait until no payment is between created and final, so a step starts on an idle
    platform and is not charged with the previous step's backlog."""
    conn = await asyncpg.connect(f"{pg_url}/clearhouse_payments")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and await conn.fetchval(
                "SELECT count(*) FROM payments WHERE status IN ('pending_approval', 'approved', 'submitted')"):
            await asyncio.sleep(1)
    finally:
        await conn.close()


def log_problems(logs: Path) -> str:
    """WARNING and ERROR lines of every process log, counted by message (ids removed)."""
    counts: dict[str, int] = defaultdict(int)
    for path in sorted(logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if '"level":"WARNING"' in line or '"level":"ERROR"' in line:
                try:
                    message = str(orjson.loads(line).get("message", ""))[:120]
                except orjson.JSONDecodeError:
                    message = line[:120]
                counts[f"{path.stem}: {re.sub(r'[0-9a-f-]{16,}', '…', message)}"] += 1
    return "\n".join(f"    {n:6d}  {m}" for m, n in sorted(counts.items(), key=lambda kv: -kv[1])[:15]) or "    none"


async def run(args: argparse.Namespace) -> None:
    print(f"load before: {os.getloadavg()}", flush=True)
    steps: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="clearhouse-load-") as tmp:
        running = start_platform(Path(tmp) / "home")
        try:
            base = f"http://127.0.0.1:{running.gateway_port}"
            accounts = await customer_accounts(base, running.key)
            sampler = Sampler(running.proc.pid, running.home / "pg")
            print("warm-up: 5/s for 10 s", flush=True)
            warm = Step(5, 10)
            await send_payments(warm, running.gateway_port, running.key, accounts)
            await collect_outcomes(warm, running.pg_url)
            saturated = False
            # Ascending rates until one does not keep up; the headline rate is always measured.
            for rate in sorted({*args.ramp, args.rate}):
                if saturated and rate != args.rate:
                    continue
                await quiesce(running.pg_url)
                step = Step(rate, args.seconds if rate == args.rate else args.ramp_seconds)
                sampler.begin()
                await send_payments(step, running.gateway_port, running.key, accounts)
                sampler.end(step)
                await collect_outcomes(step, running.pg_url)
                steps.append(step)
                print(report(step), flush=True)
                print(resources(step), flush=True)
                if rate == args.rate:
                    await asyncio.sleep(3)  # span exporters flush in batches
                    spans_by_trace: dict[str, list[Span]] = defaultdict(list)
                    for span in load_spans(running.home / "traces"):
                        spans_by_trace[span.trace_id].append(span)
                    slow = sorted(step.posted, key=step.posted.__getitem__, reverse=True)[:args.slowest]
                    print(f"where the time goes at {rate:g}/s:", flush=True)
                    print(breakdown(step, spans_by_trace, await trace_ids(running.pg_url, slow), args.slowest),
                          flush=True)
                saturated = saturated or not step.kept_up
        finally:
            print("warnings and errors in the process logs:\n" + log_problems(running.home / "logs"), flush=True)
            stop_platform(running)
    kept = [s for s in steps if s.kept_up]
    print(f"\nsustained: {max(s.rate for s in kept):g} payments/s end to end" if kept
          else "\nsustained: below the lowest step")
    for step in steps:
        if not step.kept_up and step.posted:
            # Completed rate while saturated: posted payments over the time from the first send to the last post.
            window = max(step.sent[p] + t for p, t in step.posted.items()) - min(step.sent.values())
            print(f"at {step.rate:g}/s offered: {len(step.posted)} of {len(step.sent)} posted within the drain, "
                  f"{len(step.posted) / window:.1f}/s completed over {window:.0f} s")
    print(f"load after: {os.getloadavg()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="the measured step, payments/s")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--ramp", type=lambda s: [float(r) for r in s.split(",") if r],
                        default=[5, 10, 20, 30, 40, 75, 100, 150])
    parser.add_argument("--ramp-seconds", type=float, default=20.0)
    parser.add_argument("--slowest", type=int, default=3, help="traces shown from the first step")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
