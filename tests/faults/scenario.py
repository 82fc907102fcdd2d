"""One fault-suite run: payments flow through the gateway while processes are killed and
the broker is restarted empty; then the platform must come to rest with every payment in
the end its kind demands and every cent where it belongs.

    plan (seeded) ─▶ accounts + funding ─▶ ┌ partner: payments, POSTs duplicated at once ┐
                                           │ checkers: approve / reject through the API  │ concurrently
                                           └ injector: SIGKILL api/relay/consumer, broker┘
                   ─▶ quiescence ─▶ statuses, balances, processor payouts, no doubles ─▶ verify

Everything random comes from `random.Random` seeded from one number, drawn before the run
starts (the plan and the fault schedule), so a seed names a run; the sandbox's webhook
chaos is seeded with it too. Timing still varies: a seed replays the same inputs and
faults, not the same interleaving.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from tests.faults.chaos import BROKER, SERVICES, Injector
from tests.faults.workload import FINAL, IBAN, KINDS, Client, Planned, amount_for, each_page
from tests.running import ROOT


@dataclass(frozen=True)
class Form:
    payments: int
    faults: tuple[str, ...]  # kinds: api, relay, consumer, broker
    spread_s: float  # payments are created over about this long
    concurrency: int  # payments being created at once
    first_fault_s: tuple[float, float]  # the first fault lands within this window
    fault_gap_s: tuple[float, float]  # then one fault every this many seconds
    settle_timeout_s: float


BOUNDED = Form(payments=40, faults=("api", "relay", "consumer", "broker"), spread_s=20, concurrency=6,
               first_fault_s=(2, 6), fault_gap_s=(3, 7), settle_timeout_s=240)
LONG = Form(payments=400, faults=("api", "relay", "consumer") * 10 + ("broker",) * 5, spread_s=240, concurrency=10,
            first_fault_s=(2, 6), fault_gap_s=(3, 9), settle_timeout_s=900)


@dataclass
class Outcome:
    seed: int
    form: Form
    plan: list[Planned]
    faults: list = field(default_factory=list)
    replays: dict[str, int] = field(default_factory=dict)
    post_answers: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    verify_output: str = ""

    def summary(self) -> str:
        faults = Counter(f.target for f in self.faults)
        slowest = max((f.recovered_s for f in self.faults), default=0)
        return "\n".join([
            f"seed {self.seed}: {len(self.plan)} payments "
            f"({', '.join(f'{k} {n}' for k, n in sorted(Counter(p.kind for p in self.plan).items()))})",
            f"  final statuses: {dict(sorted(self.statuses.items()))}",
            f"  POST answers seen (0 = connection broken): {dict(sorted(self.post_answers.items()))}",
            f"  faults injected: {len(self.faults)} ({', '.join(f'{t} ×{n}' for t, n in sorted(faults.items()))}); "
            f"slowest recovery {slowest}s",
            f"  relay replays after broker loss: {self.replays}",
            f"  timings: {self.seconds}",
        ])


def make_plan(form: Form, rng: random.Random, accounts: dict[str, list[str]]) -> list[Planned]:
    kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]
    plan = []
    for index in range(form.payments):
        kind = rng.choices(kinds, weights)[0]
        account = rng.choice(accounts["poor" if kind == "insufficient" else "rich"])
        plan.append(Planned(index=index, kind=kind, amount=amount_for(kind, rng), account=account,
                            copies=rng.randint(1, 3)))
    return plan


def fault_schedule(form: Form, rng: random.Random) -> list[tuple[float, str]]:
    """(delay before it, target) per fault. Targets of a kind are drawn from a shuffled
    bag, refilled when empty, so a long run kills every service's api, relay and consumer
    (and the gateway) about equally often, never one service only by chance."""
    kinds = list(form.faults)
    rng.shuffle(kinds)
    bags: dict[str, list[str]] = {}
    schedule = []
    for n, kind in enumerate(kinds):
        delay = rng.uniform(*(form.first_fault_s if n == 0 else form.fault_gap_s))
        if kind == "broker":
            schedule.append((delay, BROKER))
            continue
        if not bags.get(kind):
            bags[kind] = [f"{s}-{kind}" for s in (*SERVICES, "gateway") if kind == "api" or s != "gateway"]
            rng.shuffle(bags[kind])
        schedule.append((delay, bags[kind].pop()))
    return schedule


class Run:
    def __init__(self, *, home: Path, gateway: str, demo_key: str, up_pid: int, seed: int, form: Form) -> None:
        self.home, self.gateway, self.seed, self.form = home, gateway, seed, form
        self.injector = Injector(home=home, up_pid=up_pid)
        self.maker = Client(gateway, demo_key, who="partner")

    # ── the run ─────────────────────────────────────────────────────────────────
    async def go(self) -> Outcome:
        started = time.monotonic()
        reader_key, checker_keys = await self._keys()
        self.reader = Client(self.gateway, reader_key, who="reader")
        self.checkers = [Client(self.gateway, k, who=f"checker{n + 1}") for n, k in enumerate(checker_keys)]
        accounts = {"rich": [await self._account(f"rich {n}") for n in range(3)],
                    "poor": [await self._account(f"poor {n}") for n in range(2)]}
        plan = make_plan(self.form, random.Random(f"{self.seed}/plan"), accounts)
        schedule = fault_schedule(self.form, random.Random(f"{self.seed}/faults"))
        self.funding = await self._fund(plan, accounts)
        outcome = Outcome(seed=self.seed, form=self.form, plan=plan)
        self.outcome = outcome
        replays_before = {s: self.injector.relay_replays(s) for s in SERVICES}
        try:
            flowing = time.monotonic()
            await asyncio.gather(self._partner(plan), self._checkers(plan), self._inject(schedule))
            outcome.seconds["flow_and_faults"] = round(time.monotonic() - flowing, 1)
            outcome.faults = self.injector.log
            outcome.replays = {s: self.injector.relay_replays(s) - replays_before[s] for s in SERVICES}
            resting = time.monotonic()
            await self._quiescence(plan)
            outcome.seconds["quiescence"] = round(time.monotonic() - resting, 1)
            await self._balances_add_up(plan)
            self._processor_moved_each_once(plan)
            await self._nothing_doubled(plan)
            await self._nothing_dead_lettered()
            outcome.verify_output = await self._verify()
            outcome.seconds["total"] = round(time.monotonic() - started, 1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{await self._diagnosis()}") from None
        finally:
            for client in (self.maker, self.reader, *self.checkers):
                await client.close()
        return outcome

    async def _diagnosis(self) -> str:
        """What a failure needs explained: the faults so far and any transaction that has
        stayed open (a stuck one holds its locks)."""
        lines = [f"faults: {self.injector.log}"]
        conn = await asyncpg.connect(f"{self._admin_url()}/postgres")
        try:
            for row in await conn.fetch(
                    "SELECT datname, application_name, pid, state, now() - xact_start AS age, "
                    "left(query, 200) AS query "
                    "FROM pg_stat_activity WHERE xact_start < now() - interval '5 seconds'"):
                lines.append(f"open transaction: {dict(row)}")
        finally:
            await conn.close()
        return "\n".join(lines)

    # ── set-up ──────────────────────────────────────────────────────────────────
    async def _keys(self) -> tuple[str, list[str]]:
        async def create(principal: str, scopes: str) -> str:
            done = await asyncio.to_thread(cli, self.home, "keys", "create", "--tenant", "demo", "--principal",
                                           principal, "--scopes", scopes, "--json")
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)["key"]

        reader = await create("fault-reader", "payments:read,ledger:read,approvals:read")
        checkers = [await create(f"checker-{n}", "approvals:read,approvals:decide,payments:read") for n in (1, 2)]
        return reader, checkers

    async def _account(self, name: str) -> str:
        response, _ = await self.maker.post("/v1/ledger/accounts", {"name": f"fault {name}", "currency": "EUR",
                                                                    "normal_balance": "credit"},
                                            key=f"account-{self.seed}-{name}")
        assert response.status_code == 201, response.text
        return response.json()["id"]

    async def _fund(self, plan: list[Planned], accounts: dict[str, list[str]]) -> dict[str, int]:
        """Rich accounts get every payment planned on them and a margin (so all can settle
        even while holds of the failing ones are pending); poor ones get 1,000 minor units."""
        need = defaultdict(int)
        for p in plan:
            need[p.account] += p.amount
        funding = {a: need[a] + 100_000 for a in accounts["rich"]} | {a: 1_000 for a in accounts["poor"]}
        source, _ = await self.maker.post("/v1/ledger/accounts", {"name": "fault funding", "currency": "EUR",
                                                                  "normal_balance": "debit", "allow_negative": True},
                                          key=f"account-{self.seed}-funding")
        assert source.status_code == 201, source.text
        for account, amount in funding.items():
            response, _ = await self.maker.post("/v1/ledger/transactions", {"entries": [
                {"account_id": source.json()["id"], "direction": "debit", "amount": amount},
                {"account_id": account, "direction": "credit", "amount": amount}]}, key=f"fund-{self.seed}-{account}")
            assert response.status_code == 201, response.text
        return funding

    # ── while it flows ─────────────────────────────────────────────────────────────
    async def _partner(self, plan: list[Planned]) -> None:
        rng, gate = random.Random(f"{self.seed}/pace"), asyncio.Semaphore(self.form.concurrency)
        mean_gap = self.form.spread_s / max(1, len(plan))

        async def one(p: Planned) -> None:
            async with gate:
                body = {"amount": p.amount, "currency": "EUR", "debit_account_id": p.account,
                        "payee": {"name": "Jane Doe", "iban": IBAN}, "reference": self._reference(p)}
                response, seen = await self.maker.post("/v1/payments", body, key=f"pay-{self.seed}-{p.index}",
                                                       copies=p.copies)
                p.answers = seen
                self.outcome.post_answers.update(seen)
                assert response.status_code == 201, f"payment {p.index}: {response.status_code} {response.text}"
                p.id = response.json()["id"]
                if p.kind == "cancelled":
                    cancelled, seen = await self.maker.post(f"/v1/payments/{p.id}/cancel", {"reason": "changed mind"},
                                                            key=f"cancel-{self.seed}-{p.index}", copies=p.copies)
                    self.outcome.post_answers.update(seen)
                    assert cancelled.status_code == 200, f"cancel {p.id}: {cancelled.status_code} {cancelled.text}"

        tasks = []
        for p in plan:
            tasks.append(asyncio.create_task(one(p)))
            await asyncio.sleep(rng.expovariate(1 / mean_gap))
        await asyncio.gather(*tasks)

    def _reference(self, p: Planned) -> str:
        return f"fault {self.seed} #{p.index} {p.kind}"

    async def _checkers(self, plan: list[Planned]) -> None:
        """Decide every approval the plan calls for, as the checkers, through the API."""
        verdicts = {"one_checker": ("approve", 1), "two_checkers": ("approve", 2), "rejected": ("reject", 1)}
        waiting = {p.index for p in plan if p.kind in verdicts}
        deadline = time.monotonic() + self.form.spread_s + self.form.settle_timeout_s
        while waiting:
            assert time.monotonic() < deadline, f"approvals never showed up for payments {sorted(waiting)}"
            by_id = {p.id: p for p in plan if p.id and p.index in waiting}
            async for approval in each_page(self.checkers[0], "/v1/approvals", status="pending",
                                            subject_type="payment"):
                p = by_id.get(approval["subject_id"])
                if p is None:
                    continue
                verdict, checkers = verdicts[p.kind]
                for checker in self.checkers[:checkers]:
                    response, seen = await checker.post(
                        f"/v1/approvals/{approval['id']}/decisions", {"decision": verdict, "reason": "fault suite"},
                        key=f"decide-{approval['id']}-{checker.who}")
                    self.outcome.post_answers.update(seen)
                    # 409: already decided (a retry after the first answer was lost)
                    assert response.status_code in (201, 409), f"{checker.who}: {response.status_code} {response.text}"
                waiting.discard(p.index)
            await asyncio.sleep(0.5)

    async def _inject(self, schedule: list[tuple[float, str]]) -> None:
        for delay, target in schedule:
            await asyncio.sleep(delay)
            replays = {s: self.injector.relay_replays(s) for s in ("payments", "approvals", "ledger")}
            await self.injector.kill(target)
            if target == BROKER:
                # Proof of the replay: every relay with published events finds its topic gone.
                await _eventually(lambda: all(self.injector.relay_replays(s) > n for s, n in replays.items()),
                                  timeout=120, what=f"relays replaying after the broker restart ({replays})")

    # ── at rest ─────────────────────────────────────────────────────────────────────
    async def _quiescence(self, plan: list[Planned]) -> None:
        ours = {p.id: p for p in plan}

        async def all_final() -> bool:
            statuses = {}
            async for payment in each_page(self.reader, "/v1/payments"):
                if payment["id"] in ours:
                    statuses[payment["id"]] = payment
            self.last_seen = statuses
            return all(s["status"] in FINAL for s in statuses.values()) and len(statuses) == len(ours)

        try:
            await _eventually(all_final, timeout=self.form.settle_timeout_s, interval=1.0, what="every payment final")
        except AssertionError:
            stuck = {i: (s["status"], ours[i].kind) for i, s in getattr(self, "last_seen", {}).items()
                     if s["status"] not in FINAL}
            timelines = []
            for payment_id in list(stuck)[:5]:
                events = (await self.maker.get(f"/v1/payments/{payment_id}/timeline"))["events"]
                timelines.append(f"{payment_id}: " + ", ".join(f"{e['occurred_at'][11:23]} {e['service']} {e['type']}"
                                                               for e in events))
            raise AssertionError(f"payments not final after {self.form.settle_timeout_s}s: {stuck}\n"
                                 + "\n".join(timelines)) from None
        wrong = []
        for p in plan:
            seen = self.last_seen[p.id]
            self.outcome.statuses[seen["status"]] += 1
            if seen["status"] != p.expected:
                wrong.append(f"#{p.index} {p.kind} {p.amount} {p.id}: {seen['status']} ({seen['failure_reason']}), "
                             f"expected {p.expected}")
            elif p.kind == "insufficient" and seen["failure_reason"] != "insufficient_funds":
                wrong.append(f"#{p.index} {p.id}: failed for {seen['failure_reason']}, expected insufficient_funds")
        assert not wrong, "payments ended wrong:\n" + "\n".join(wrong)

    async def _balances_add_up(self, plan: list[Planned]) -> None:
        """Zero lost or doubled money: each account's balance is its funding minus its
        settled payments, and nothing stays reserved."""
        settled = defaultdict(int)
        for p in plan:
            if p.expected == "settled":
                settled[p.account] += p.amount
        for account, funded in self.funding.items():
            want = funded - settled[account]

            async def right(account=account, want=want) -> bool:
                self.balance = await self.reader.get(f"/v1/ledger/accounts/{account}/balance")
                got = self.balance
                return (got["posted"], got["pending"], got["available"]) == (want, want, want)

            try:
                await _eventually(right, timeout=120, interval=0.5, what="balances")
            except AssertionError:
                raise AssertionError(f"account {account}: funded {funded}, settled {settled[account]}, so {want} "
                                     f"expected everywhere; the ledger says {self.balance}") from None

    def _processor_moved_each_once(self, plan: list[Planned]) -> None:
        """The money that really leaves: the sandbox processor paid each settled payment
        exactly once, for its amount, and paid nothing for any other."""
        db = sqlite3.connect(f"file:{self.home / 'sandbox.sqlite3'}?mode=ro", uri=True)
        try:
            payouts = defaultdict(list)
            for e2e, status, amount in db.execute("SELECT end_to_end_id, status, amount FROM payouts"):
                payouts[e2e].append((status, amount))
        finally:
            db.close()
        wrong = []
        for p in plan:
            got = payouts.get(p.id, [])
            if p.expected == "settled" and got != [("settled", p.amount)]:
                wrong.append(f"#{p.index} {p.kind} {p.id}: processor payouts {got}")
            if p.expected != "settled" and any(status == "settled" for status, _ in got):
                wrong.append(f"#{p.index} {p.kind} {p.id} ended {p.expected} but the processor paid it: {got}")
            if len(got) > 1:
                wrong.append(f"#{p.index} {p.id}: {len(got)} payouts at the processor")
        assert not wrong, "processor payouts:\n" + "\n".join(wrong)

    async def _nothing_doubled(self, plan: list[Planned]) -> None:
        """One payment per Idempotency-Key, however many times it was sent."""
        by_reference = Counter()
        references = {self._reference(p) for p in plan}
        async for payment in each_page(self.reader, "/v1/payments"):
            if payment["reference"] in references:
                by_reference[payment["reference"]] += 1
        doubled = {r: n for r, n in by_reference.items() if n != 1}
        assert not doubled and len(by_reference) == len(plan), f"payments per reference: {doubled}"

    async def _nothing_dead_lettered(self) -> None:
        """A fault is never a message's fault: no consumer parked an event in a DLQ."""
        parked = {}
        for service in SERVICES:
            conn = await asyncpg.connect(f"{self._admin_url()}/clearhouse_{service}")
            try:
                rows = await conn.fetch("SELECT consumer, event_type, event_id FROM processed_events "
                                        "WHERE outcome = 'dead_lettered'")
            finally:
                await conn.close()
            if rows:
                parked[service] = [dict(r) for r in rows]
        assert not parked, f"events dead-lettered during the run: {parked}"

    def _admin_url(self) -> str:
        port = json.loads((self.home / "state.json").read_text())["ports"]["postgres"]
        return f"postgresql://postgres@127.0.0.1:{port}"

    async def _verify(self) -> str:
        # --grace 5: the platform is quiet; only what committed in the last moments may
        # still be on its way (reconciliation's read model, a last relay batch).
        done = await asyncio.to_thread(cli, self.home, "verify", "--grace", "5")
        assert done.returncode == 0 and "✗" not in done.stdout, done.stdout + done.stderr
        return done.stdout


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clearhouse", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CLEARHOUSE_HOME": str(home)}, timeout=300)


async def _eventually(check, *, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)
