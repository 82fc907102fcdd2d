"""Background jobs of the payments service, run inside its consumer process:
`run_jobs(settings, sessionmaker, stop)`.

    submitter  claims due attempts (FOR UPDATE SKIP LOCKED, leased), sends each to its
               processor under the attempt id as idempotency key, records the answer:
                 accepted      → payment submitted (or further, if the news was final)
                 rejected      → payment failed, nothing moved, the ledger voids the hold
                 no answer     → retried with exponential backoff and jitter; after
                                 `submit_max_tries` the attempt is `unknown`
    janitor    asks the processor about attempts in doubt: `unknown` ones, and
               `submitted` ones without a final word after `janitor_stuck_after_s`;
               applies what it hears as if a webhook had said it, or resends an
               attempt the processor confirms it never received
    purge      forgets idempotency keys older than 48 hours

The submitter polls every `submit_poll_interval_s`, and is woken at once when this
process's consumer commits a reservation (`submissions_due`, after commit): the money
flow then waits for no poll between "funds reserved" and "sent to the processor".

Crash safety: the processor call sits between two transactions. If the process dies
after the call and before recording its answer, the attempt stays `sending` until its
lease runs out; then it is sent again under the same request id, and the processor
answers with the payout it already has instead of paying twice. A per-processor circuit
breaker stops calls while the processor keeps failing and lets one trial through after
a cooldown.

This module never holds a database transaction open across a processor call, and never
logs payee data.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.payments import service
from services.payments.connector import Connector, ProcessorRejected, ProcessorUnavailable, build_connectors
from services.payments.crypto import PayeeCipher, cipher_from_settings
from shared import context
from shared.idempotency import purge_expired_keys
from shared.telemetry import context_from_traceparent
from shared.uow import run_in_transaction

log = logging.getLogger(__name__)
tracer = trace.get_tracer("clearhouse.payments.jobs")

PROCESSOR_CALLS = Counter("clearhouse_payments_processor_calls_total", "Calls to a payment processor, by outcome",
                          ["processor", "operation", "outcome"])
CIRCUIT_OPEN = Gauge("clearhouse_payments_processor_circuit_open", "1 while calls to the processor are suspended",
                     ["processor"])
ATTEMPTS_IN_DOUBT = Counter("clearhouse_payments_attempts_unknown_total",
                            "Attempts whose retries ran out without an answer (handed to the janitor)", ["processor"])

PURGE_INTERVAL_S = 3600.0


# ── retry policy ───────────────────────────────────────────────────────────────────


def retry_delay(tries: int, *, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": half the step is certain, half random, so
    retries of many attempts spread out yet none comes back at once."""
    step = min(cap_s, base_s * 2 ** max(0, min(tries - 1, 30)))
    return step / 2 + (rng or random).uniform(0, step / 2)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """closed ──N failures in a row──▶ open ──cooldown──▶ half-open ──trial ok──▶ closed
                                         ▲                    │
                                         └────trial failed────┘"""

    def __init__(self, *, name: str, failure_threshold: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._trial_out = False

    def allow(self) -> bool:
        """May a call go out now? In half-open state, exactly one trial call may."""
        if self.state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self.state, self._trial_out = BreakerState.HALF_OPEN, False
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.HALF_OPEN and not self._trial_out:
            self._trial_out = True
            return True
        return False

    def retry_after(self) -> float:
        if self.state is BreakerState.OPEN:
            return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))
        return 0.0

    def record_success(self) -> None:
        if self.state is not BreakerState.CLOSED:
            log.info("processor %s answers again: circuit closed", self.name)
        self.state, self.failures, self._trial_out = BreakerState.CLOSED, 0, False
        CIRCUIT_OPEN.labels(self.name).set(0)

    def record_failure(self) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or (self.state is BreakerState.CLOSED
                                                    and self.failures >= self.failure_threshold):
            if self.state is BreakerState.CLOSED:
                log.warning("processor %s failed %d times in a row: circuit open for %.0fs", self.name,
                            self.failures, self.cooldown_s)
            self.state, self._opened_at, self._trial_out = BreakerState.OPEN, self._clock(), False
            CIRCUIT_OPEN.labels(self.name).set(1)


# ── the jobs ───────────────────────────────────────────────────────────────────────

_submitter_wakers: set[Callable[[], None]] = set()  # one per running Jobs in this process


def submissions_due() -> None:
    """Attempts became due in this process (a committed reservation): wake its submitter.
    Other processes' submitters find them at their next poll."""
    for wake in list(_submitter_wakers):
        wake()



class Jobs:
    def __init__(self, *, settings, sessionmaker: async_sessionmaker[AsyncSession],
                 connectors: dict[str, Connector], cipher: PayeeCipher) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.connectors = connectors
        self.cipher = cipher
        self.breakers = {name: CircuitBreaker(name=name, failure_threshold=settings.breaker_failure_threshold,
                                              cooldown_s=settings.breaker_cooldown_s) for name in connectors}

    async def run(self, stop: asyncio.Event) -> None:
        due = asyncio.Event()
        _submitter_wakers.add(due.set)
        try:
            await asyncio.gather(self._forever(stop, self.submit_due, self.settings.submit_poll_interval_s, wake=due),
                                 self._forever(stop, self.check_in_doubt, self.settings.janitor_interval_s),
                                 self._forever(stop, self.purge_keys, PURGE_INTERVAL_S))
        finally:
            _submitter_wakers.discard(due.set)

    async def _forever(self, stop: asyncio.Event, step: Callable[[], Awaitable[int]], interval: float, *,
                       wake: asyncio.Event | None = None) -> None:
        failures = 0
        while not stop.is_set():
            if wake is not None:
                wake.clear()  # a wake-up during this step runs the next one at once
            try:
                busy = await step()
                failures = 0
            except Exception as exc:  # the database is away, most likely: keep the loop alive
                failures += 1
                busy = 0
                log.warning("payments job %s failed: %s", step.__name__, type(exc).__name__, exc_info=exc)
                await _sleep_or_stop(stop, min(30.0, 0.5 * 2 ** min(failures, 6)))
            if not busy:
                await _sleep_or_stop(stop, interval, wake=wake)

    # ── submitter ──
    async def submit_due(self) -> int:
        """One round: claim what can be sent at once, send it concurrently, record the
        answers. Returns how many were sent; the loop goes on at once while there are.
        Claiming no more than is sent at once keeps every claimed attempt on the wire
        well within its lease."""
        limit = self._claim_limit()
        if limit == 0:
            return 0
        claimed = await run_in_transaction(self.sessionmaker, lambda uow: service.claim_submissions(
            uow=uow, cipher=self.cipher, limit=limit, lease_s=self.settings.submit_lease_s))
        sent = await asyncio.gather(*(self._submit(s) for s in claimed))
        return sum(sent)  # attempts given back unsent (circuit open) do not make the loop spin

    def _claim_limit(self) -> int:
        # Every attempt goes to the sandbox today; with several processors the claim would
        # be filtered by the processors whose circuits are closed.
        breakers = self.breakers.values()
        if all(b.state is BreakerState.CLOSED for b in breakers):
            return self.settings.submit_concurrency
        # Open: nothing. Half-open (cooldown over): one attempt, the trial.
        return 1 if any(b.state is not BreakerState.OPEN or b.retry_after() == 0 for b in breakers) else 0

    async def _submit(self, submission: service.Submission) -> bool:
        """Send one claimed attempt; False if it was given back unsent."""
        attempt = submission.attempt
        breaker = self.breakers[attempt.processor]
        if not breaker.allow():
            await run_in_transaction(self.sessionmaker, lambda uow: service.release_submission(
                uow=uow, submission=submission))
            return False
        connector = self.connectors[attempt.processor]
        operation = f"create_{attempt.kind}"
        with _AttemptScope(attempt, "payments submit", actor="job:submitter"):
            found, rejection, failure = None, None, None
            try:
                if submission.payout is not None:
                    found = await connector.create_payout(submission.payout)
                else:
                    found = await connector.create_refund(submission.refund)
            except ProcessorRejected as exc:
                rejection = exc
            except ProcessorUnavailable as exc:
                failure = exc
            if rejection is not None:
                breaker.record_success()  # it answered: the processor is up
                PROCESSOR_CALLS.labels(attempt.processor, operation, "rejected").inc()
                await run_in_transaction(self.sessionmaker, lambda uow: service.record_submission_rejected(
                    uow=uow, submission=submission, rejection=rejection))
            elif failure is not None:
                breaker.record_failure()
                PROCESSOR_CALLS.labels(attempt.processor, operation, "unavailable").inc()
                delay = retry_delay(submission.tries, base_s=self.settings.submit_backoff_base_s,
                                    cap_s=self.settings.submit_backoff_max_s)
                in_doubt = await run_in_transaction(
                    self.sessionmaker, lambda uow: service.record_submission_unavailable(
                        uow=uow, submission=submission, error=str(failure), max_tries=self.settings.submit_max_tries,
                        retry_in_s=delay, recheck_in_s=self.settings.janitor_recheck_s))
                if in_doubt:
                    ATTEMPTS_IN_DOUBT.labels(attempt.processor).inc()
                    log.warning("%s attempt in doubt after %d tries; the janitor takes over", attempt.kind,
                                submission.tries, extra={"payment_id": str(attempt.payment_id)})
            else:
                breaker.record_success()
                PROCESSOR_CALLS.labels(attempt.processor, operation, "accepted").inc()
                await run_in_transaction(self.sessionmaker, lambda uow: service.record_submission_accepted(
                    uow=uow, submission=submission, found=found))
        return True

    # ── janitor ──
    async def check_in_doubt(self) -> int:
        if not any(b.state is not BreakerState.OPEN or b.retry_after() == 0 for b in self.breakers.values()):
            return 0
        attempts = await run_in_transaction(self.sessionmaker, lambda uow: service.claim_checks(
            uow=uow, limit=100, stuck_after_s=self.settings.janitor_stuck_after_s,
            recheck_s=self.settings.janitor_recheck_s))
        gate = asyncio.Semaphore(self.settings.submit_concurrency)

        async def one(attempt) -> None:
            async with gate:
                await self._check(attempt)

        await asyncio.gather(*(one(a) for a in attempts))
        return 0  # checks are paced by the interval, never back to back

    async def _check(self, attempt) -> None:
        breaker = self.breakers[attempt.processor]
        if not breaker.allow():
            return  # its next check is already scheduled
        with _AttemptScope(attempt, "payments janitor check", actor="job:janitor"):
            try:
                found = await self.connectors[attempt.processor].find(kind=attempt.kind, request_id=attempt.id)
            except ProcessorUnavailable:
                breaker.record_failure()
                PROCESSOR_CALLS.labels(attempt.processor, f"find_{attempt.kind}", "unavailable").inc()
                return
            breaker.record_success()
            PROCESSOR_CALLS.labels(attempt.processor, f"find_{attempt.kind}",
                                   "found" if found else "not_found").inc()
            result = await run_in_transaction(self.sessionmaker, lambda uow: service.record_check(
                uow=uow, attempt=attempt, found=found))
            log.info("janitor checked a %s attempt: %s", attempt.kind, result,
                     extra={"payment_id": str(attempt.payment_id), "attempt_id": str(attempt.id)})

    # ── housekeeping ──
    async def purge_keys(self) -> int:
        await purge_expired_keys(self.sessionmaker)
        return 0


class _AttemptScope:
    """Continue the payment's trace and correlation in a job's work on one attempt."""

    def __init__(self, attempt, name: str, *, actor: str) -> None:
        self.attempt, self.name, self.actor = attempt, name, actor

    def __enter__(self):
        attempt = self.attempt
        self._token = context.start(tenant_id=attempt.tenant_id, actor=self.actor,
                                    correlation_id=attempt.correlation_id or str(attempt.payment_id))
        self._span = tracer.start_as_current_span(
            self.name, context=context_from_traceparent(attempt.traceparent), kind=SpanKind.INTERNAL,
            attributes={"clearhouse.payment_id": str(attempt.payment_id), "clearhouse.attempt_id": str(attempt.id),
                        "clearhouse.processor": attempt.processor})
        self._span.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self._span.__exit__(*exc)
        finally:
            context.reset(self._token)


async def run_jobs(settings, sessionmaker: async_sessionmaker[AsyncSession], stop: asyncio.Event) -> None:
    """Entry point for the consumer process: runs until `stop` is set."""
    connectors = build_connectors(settings)
    jobs = Jobs(settings=settings, sessionmaker=sessionmaker, connectors=connectors,
                cipher=cipher_from_settings(settings))
    try:
        await jobs.run(stop)
    finally:
        for connector in connectors.values():
            await connector.aclose()


async def _sleep_or_stop(stop: asyncio.Event, delay: float, *, wake: asyncio.Event | None = None) -> None:
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
