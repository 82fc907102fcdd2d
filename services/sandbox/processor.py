"""The sandbox processor's engine: payouts and refunds, their lifecycle, and signed
webhooks about them. A stand-in for a real processor that behaves like one, including
its bad days.

    POST payout (Idempotency-Key = the caller's request id)
      └─ pending ──processing_delay──▶ processing ──settle_delay──▶ settled | failed
                    webhook payout.processing              webhook payout.settled | payout.failed
    POST refund (of a settled payout, within its amount)
      └─ pending ──refund_delay──▶ succeeded | failed        webhook refund.succeeded | refund.failed

Webhooks about one payout or refund are delivered in order, each retried with backoff
until it gets a 2xx, without holding up the lifecycle. A restart forgets deliveries still
queued (the payments janitor's polling covers that) but resumes unfinished lifecycles.

Deterministic triggers, like card test numbers:

    amount ending in 13 (minor units)   payout fails with AM04 (insufficient funds)
    amount ending in 14                 payout fails with AC04 (account closed)
    amount ending in 22                 refused at once: 422 invalid_creditor_account
    refund amount ending in 13          refund fails with AM04
    reference containing FLAKY          the first two requests answer 503 (nothing stored)
    reference containing TIMEOUT        the first request is stored, then stalls `stall_s`
    reference containing DOUBLE         every webhook is delivered twice, concurrently
    reference containing OUTOFORDER     the final webhook is delivered before `processing`
    reference containing NOWEBHOOK      no webhooks: the status is only learned by polling

Chaos mode (`webhook_chaos_seed` set, for the fault suite): every webhook is delivered 1–3
times, each copy after its own random delay, so duplicates and reordering are the rule.

State lives in SQLite (`db_path`; ":memory:" by default, a file under `clearhouse up`),
so a restarted sandbox still knows its payouts, resumes unfinished lifecycles and serves
past statements. It stores the creditor's IBAN masked only and never the name: it needs
neither to simulate, and a development data directory should not collect PII.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

import httpx
import orjson

from services.sandbox.settings import Settings
from shared.redaction import mask_iban

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Clearhouse-Signature"
FAILURE_TRIGGERS = {13: "AM04", 14: "AC04"}
REJECT_TRIGGER = 22

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS payouts (
        id TEXT PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, request_hash TEXT NOT NULL,
        amount INTEGER NOT NULL, currency TEXT NOT NULL, reference TEXT NOT NULL, end_to_end_id TEXT NOT NULL,
        creditor_iban_masked TEXT NOT NULL, status TEXT NOT NULL, failure_code TEXT, value_date TEXT,
        created REAL NOT NULL, updated REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS refunds (
        id TEXT PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, request_hash TEXT NOT NULL, payout_id TEXT NOT NULL,
        amount INTEGER NOT NULL, currency TEXT NOT NULL, end_to_end_id TEXT NOT NULL, status TEXT NOT NULL,
        failure_code TEXT, value_date TEXT, created REAL NOT NULL, updated REAL NOT NULL)""",
    # Refusals are remembered too, so a retried request gets the same answer.
    """CREATE TABLE IF NOT EXISTS refusals (
        request_id TEXT PRIMARY KEY, request_hash TEXT NOT NULL, status INTEGER NOT NULL, code TEXT NOT NULL,
        detail TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS payouts_by_value_date ON payouts (value_date)",
    "CREATE INDEX IF NOT EXISTS refunds_by_value_date ON refunds (value_date)",
]


class SandboxRefusal(Exception):
    """An answer other than success: HTTP status, stable code, human detail."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@dataclass(frozen=True)
class Created:
    replayed: bool
    body: dict[str, Any]


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def sign(secret: bytes, *, timestamp: int, body: bytes) -> str:
    """Stripe's scheme: HMAC-SHA256 over "<unix time>." + body."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class SandboxProcessor:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._secret = settings.secret()
        self.db = sqlite3.connect(settings.db_path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        for statement in _SCHEMA:
            self.db.execute(statement)
        self._tasks: set[asyncio.Task] = set()
        # The last delivery queued per payout/refund: its webhooks go out in order, one
        # after the other, without holding up the lifecycle (a processor settles whether
        # or not its webhooks get through).
        self._deliveries: dict[str, asyncio.Task] = {}
        self._flaky_calls: dict[str, int] = {}
        self._stalled: set[str] = set()
        self._http: httpx.AsyncClient | None = None
        seed = settings.webhook_chaos_seed
        self._chaos = random.Random(seed) if seed is not None else None

    # ── process lifecycle ──
    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=self.settings.webhook_timeout_s)
        for row in self.db.execute("SELECT id FROM payouts WHERE status IN ('pending', 'processing')"):
            self._spawn(self._run_payout(row["id"]))
        for row in self.db.execute("SELECT id FROM refunds WHERE status = 'pending'"):
            self._spawn(self._run_refund(row["id"]))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
        self.db.close()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ── payouts ──
    async def create_payout(self, *, request_id: str, body: dict[str, Any]) -> Created:
        digest = request_hash(body)
        replay = self._replay("payouts", request_id, digest)
        if replay is not None:
            return replay
        reference = body["reference"]
        if "FLAKY" in reference:
            calls = self._flaky_calls[request_id] = self._flaky_calls.get(request_id, 0) + 1
            if calls <= 2:
                raise SandboxRefusal(503, "temporarily_unavailable", "The sandbox is having a bad moment (FLAKY).")
        if body["amount"] % 100 == REJECT_TRIGGER:
            self.db.execute("INSERT OR IGNORE INTO refusals VALUES (?, ?, 422, 'invalid_creditor_account', ?)",
                            (request_id, digest, "The creditor account cannot receive payments."))
            raise SandboxRefusal(422, "invalid_creditor_account", "The creditor account cannot receive payments.")
        now = self._clock()
        payout_id = f"po_{uuid.uuid4().hex[:24]}"
        self.db.execute(
            "INSERT INTO payouts (id, request_id, request_hash, amount, currency, reference, end_to_end_id, "
            "creditor_iban_masked, status, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            (payout_id, request_id, digest, body["amount"], body["currency"], reference, body["end_to_end_id"],
             mask_iban(body["creditor"]["iban"]), now, now))
        self._spawn(self._run_payout(payout_id))
        if "TIMEOUT" in reference and request_id not in self._stalled:
            self._stalled.add(request_id)
            await asyncio.sleep(self.settings.stall_s)  # stored, but the caller gives up waiting
        return Created(replayed=False, body=self.payout(payout_id))

    def payout(self, payout_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM payouts WHERE id = ?", (payout_id,)).fetchone()
        return _payout_body(row) if row else None

    def payout_by_request(self, request_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM payouts WHERE request_id = ?", (request_id,)).fetchone()
        return _payout_body(row) if row else None

    async def _run_payout(self, payout_id: str) -> None:
        row = self.db.execute("SELECT * FROM payouts WHERE id = ?", (payout_id,)).fetchone()
        reference, held = row["reference"], []
        if row["status"] == "pending":
            await asyncio.sleep(self.settings.processing_delay_s)
            self._set("payouts", payout_id, status="processing")
            event = self._event("payout.processing", self.payout(payout_id))
            if "OUTOFORDER" in reference:
                held.append(event)  # delivered after the final word
            else:
                self._enqueue(payout_id, event, reference)
        await asyncio.sleep(self.settings.settle_delay_s)
        code = FAILURE_TRIGGERS.get(row["amount"] % 100)
        today = self._today().isoformat()
        if code:
            self._set("payouts", payout_id, status="failed", failure_code=code)
            final = self._event("payout.failed", self.payout(payout_id))
        else:
            self._set("payouts", payout_id, status="settled", value_date=today)
            final = self._event("payout.settled", self.payout(payout_id))
        self._enqueue(payout_id, final, reference)
        for event in held:
            self._enqueue(payout_id, event, reference)

    # ── refunds ──
    async def create_refund(self, *, request_id: str, body: dict[str, Any]) -> Created:
        digest = request_hash(body)
        replay = self._replay("refunds", request_id, digest)
        if replay is not None:
            return replay
        payout = self.db.execute("SELECT * FROM payouts WHERE id = ?", (body["payout_id"],)).fetchone()
        if payout is None:
            raise SandboxRefusal(404, "payout_not_found", "No such payout.")
        if payout["status"] != "settled":
            raise SandboxRefusal(422, "payout_not_settled", "Only a settled payout can be refunded.")
        if body["currency"] != payout["currency"]:
            raise SandboxRefusal(422, "currency_mismatch", "A refund is in the payout's currency.")
        refunded = self.db.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM refunds WHERE payout_id = ? AND status != 'failed'",
            (payout["id"],)).fetchone()[0]
        if refunded + body["amount"] > payout["amount"]:
            raise SandboxRefusal(422, "refund_exceeds_payout", "The refunds would exceed the payout.")
        now = self._clock()
        refund_id = f"re_{uuid.uuid4().hex[:24]}"
        self.db.execute(
            "INSERT INTO refunds (id, request_id, request_hash, payout_id, amount, currency, end_to_end_id, status, "
            "created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            (refund_id, request_id, digest, payout["id"], body["amount"], body["currency"], body["end_to_end_id"],
             now, now))
        self._spawn(self._run_refund(refund_id))
        return Created(replayed=False, body=self.refund(refund_id))

    def refund(self, refund_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM refunds WHERE id = ?", (refund_id,)).fetchone()
        return _refund_body(row) if row else None

    def refund_by_request(self, request_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM refunds WHERE request_id = ?", (request_id,)).fetchone()
        return _refund_body(row) if row else None

    async def _run_refund(self, refund_id: str) -> None:
        row = self.db.execute("SELECT r.*, p.reference FROM refunds r JOIN payouts p ON p.id = r.payout_id "
                              "WHERE r.id = ?", (refund_id,)).fetchone()
        await asyncio.sleep(self.settings.refund_delay_s)
        code = "AM04" if row["amount"] % 100 == 13 else None
        if code:
            self._set("refunds", refund_id, status="failed", failure_code=code)
            event = self._event("refund.failed", self.refund(refund_id))
        else:
            self._set("refunds", refund_id, status="succeeded", value_date=self._today().isoformat())
            event = self._event("refund.succeeded", self.refund(refund_id))
        self._enqueue(refund_id, event, row["reference"])

    # ── statements ──
    def booked_entries(self, *, up_to: date) -> list[dict[str, Any]]:
        """Every booked movement with a value date on or before `up_to`, oldest first:
        settled payouts are debits, succeeded refunds credits."""
        rows = self.db.execute(
            """SELECT 'payout' AS kind, 'DBIT' AS credit_debit, id, amount, currency, end_to_end_id, value_date,
                      updated FROM payouts WHERE status = 'settled' AND value_date <= ?
               UNION ALL
               SELECT 'refund', 'CRDT', id, amount, currency, end_to_end_id, value_date, updated
                 FROM refunds WHERE status = 'succeeded' AND value_date <= ?
               ORDER BY value_date, updated, id""", (up_to.isoformat(), up_to.isoformat()))
        return [dict(row) for row in rows]

    # ── plumbing ──
    def _replay(self, table: str, request_id: str, digest: str) -> Created | None:
        refusal = self.db.execute("SELECT * FROM refusals WHERE request_id = ?", (request_id,)).fetchone()
        if refusal is not None:
            if refusal["request_hash"] != digest:
                raise SandboxRefusal(409, "idempotency_key_reused",
                                     "This Idempotency-Key was used for another request.")
            raise SandboxRefusal(refusal["status"], refusal["code"], refusal["detail"])
        row = self.db.execute(f"SELECT * FROM {table} WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        if row["request_hash"] != digest:
            raise SandboxRefusal(409, "idempotency_key_reused", "This Idempotency-Key was used for another request.")
        body = _payout_body(row) if table == "payouts" else _refund_body(row)
        return Created(replayed=True, body=body)

    def _set(self, table: str, object_id: str, **values: Any) -> None:
        assignments = ", ".join(f"{name} = ?" for name in values)
        self.db.execute(f"UPDATE {table} SET {assignments}, updated = ? WHERE id = ?",
                        (*values.values(), self._clock(), object_id))

    def _today(self) -> date:
        return datetime.fromtimestamp(self._clock(), timezone.utc).date()

    def _event(self, type_: str, obj: dict[str, Any]) -> bytes:
        return orjson.dumps({"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": type_,
                             "created": int(self._clock()), "data": {"object": obj}})

    def _enqueue(self, object_id: str, body: bytes, reference: str) -> None:
        if "NOWEBHOOK" in reference:
            return
        if self._chaos is not None:
            # Unchained on purpose: the copies of this and the other webhooks of the same
            # payout race each other, as a processor's retries do after a timeout.
            for _ in range(self._chaos.randint(1, 3)):
                self._spawn(self._post_later(self._chaos.uniform(0, self.settings.webhook_chaos_max_delay_s), body))
            return
        previous = self._deliveries.get(object_id)
        task = self._spawn(self._deliver_after(previous, body, reference))
        self._deliveries[object_id] = task
        task.add_done_callback(lambda done: self._deliveries.pop(object_id, None)
                               if self._deliveries.get(object_id) is done else None)

    async def _deliver_after(self, previous: asyncio.Task | None, body: bytes, reference: str) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        copies = 2 if "DOUBLE" in reference else 1
        await asyncio.gather(*(self._post(body) for _ in range(copies)))

    async def _post_later(self, delay_s: float, body: bytes) -> None:
        await asyncio.sleep(delay_s)
        await self._post(body)

    async def _post(self, body: bytes) -> None:
        for attempt in range(self.settings.webhook_attempts):
            headers = {"Content-Type": "application/json",
                       SIGNATURE_HEADER: sign(self._secret, timestamp=int(self._clock()), body=body)}
            try:
                response = await self._http.post(self.settings.webhook_url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    return
                log.warning("webhook answered %d", response.status_code)
            except httpx.HTTPError as exc:
                log.warning("webhook delivery failed: %s", type(exc).__name__)
            await asyncio.sleep(min(5.0, 0.1 * 2 ** attempt))
        log.error("webhook given up after %d attempts", self.settings.webhook_attempts)


def _payout_body(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"], "object": "payout", "request_id": row["request_id"], "status": row["status"],
        "amount": row["amount"], "currency": row["currency"], "reference": row["reference"],
        "end_to_end_id": row["end_to_end_id"], "creditor": {"iban": row["creditor_iban_masked"]},
        "failure_code": row["failure_code"], "value_date": row["value_date"], "created": int(row["created"]),
    }


def _refund_body(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"], "object": "refund", "request_id": row["request_id"], "payout_id": row["payout_id"],
        "status": row["status"], "amount": row["amount"], "currency": row["currency"],
        "end_to_end_id": row["end_to_end_id"], "failure_code": row["failure_code"], "value_date": row["value_date"],
        "created": int(row["created"]),
    }
