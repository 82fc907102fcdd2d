"""The approvals timer jobs, run by the consumer process: expire pending requests past
their deadline (`approval.expired`, actor `job:approval-expiry`), send the escalation
notice before it (`approval.escalated`, actor `job:approval-escalation`), and forget
Idempotency-Keys older than 48 hours.

Safe with any number of replicas: each round locks the rows it acts on with
`FOR UPDATE SKIP LOCKED`, so replicas share the work, a request a decider holds right now
is simply left for the next round, and the domain refuses to expire anything twice. A job
must never decide a request, only let time run out on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from datetime import datetime

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.approvals import service
from services.approvals.settings import Settings
from shared import context
from shared.idempotency import purge_expired_keys
from shared.inbox import is_transient  # the kit's one definition of "infrastructure trouble"
from shared.uow import run_in_transaction

log = logging.getLogger(__name__)

JOB_FAILURES = Counter("clearhouse_approvals_job_failures_total", "Timer job rounds that failed", ["job", "kind"])
KEY_PURGE_INTERVAL_S = 3600.0


async def run_once(sessionmaker: async_sessionmaker[AsyncSession], *, now: datetime, batch_size: int) -> int:
    """One round: every request due at `now`, a batch per transaction. Returns how many
    requests were expired or escalated."""
    done = 0
    for use_case in (service.escalate_due, service.expire_overdue):
        while True:
            count = await run_in_transaction(sessionmaker, lambda uow: use_case(uow=uow, now=now, limit=batch_size))
            done += count
            if count < batch_size:
                break
    return done


async def run_jobs(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], stop: asyncio.Event) -> None:
    """The job loop (the consumer process's `jobs.run_jobs` hook): a round every
    `approval_jobs_interval_s` until `stop` is set."""
    token = context.start(actor="job:approval-expiry")
    next_purge = 0.0
    try:
        while not stop.is_set():
            await _survive("timers", run_once(sessionmaker, now=service.utcnow(),
                                              batch_size=settings.approval_jobs_batch_size))
            if time.monotonic() >= next_purge:
                await _survive("key_purge", purge_expired_keys(sessionmaker))
                next_purge = time.monotonic() + KEY_PURGE_INTERVAL_S
            try:
                await asyncio.wait_for(stop.wait(), timeout=settings.approval_jobs_interval_s)
            except asyncio.TimeoutError:
                pass
    finally:
        context.reset(token)


async def _survive(job: str, work: Awaitable[object]) -> None:
    """Nothing of a failed round committed; the next round retries. A job failure must not
    take the payment.created consumer in the same process down with it."""
    try:
        await work
    except Exception as exc:
        if is_transient(exc):
            JOB_FAILURES.labels(job, "transient").inc()
            log.warning("approval job %s: %s; retrying next round", job, type(exc).__name__)
        else:
            JOB_FAILURES.labels(job, "error").inc()
            log.exception("approval job %s failed; retrying next round", job)
