"""The run worker: executes queued reconciliation runs, in the consumer process.

    claim (own tx, FOR UPDATE SKIP LOCKED, lease) ─▶ reconcile + complete + events (one tx)
          │                                           progress: stage, lease renewed (own short tx)
          └─ a worker that dies leaves its lease to expire: another claims the run again;
             after `run_max_attempts` such deaths the run is failed, not retried for ever

Any number of replicas may run: each claims different runs, and runs of one tenant take
turns on an advisory lock. A run that raises a non-transient error is marked failed with
a stable error code (its details go to the log); it must never leave half its results.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from prometheus_client import Counter, Histogram
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.reconciliation import repository, service
from services.reconciliation.settings import Settings
from shared import context
from shared.inbox import is_transient  # the kit's one definition of infrastructure trouble
from shared.uow import UnitOfWork, run_in_transaction

log = logging.getLogger(__name__)

RUNS = Counter("clearhouse_reconciliation_runs_total", "Reconciliation runs finished, by outcome", ["outcome"])
RUN_SECONDS = Histogram("clearhouse_reconciliation_run_seconds", "Time to reconcile one statement",
                        buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300))
JOB_FAILURES = Counter("clearhouse_reconciliation_job_failures_total", "Run-loop rounds that failed", ["kind"])


async def claim(sessionmaker: async_sessionmaker[AsyncSession], *, settings: Settings) -> repository.RunRow | None:
    await run_in_transaction(sessionmaker, lambda uow: service.fail_exhausted_runs(
        uow=uow, max_attempts=settings.run_max_attempts))
    async with sessionmaker() as session, session.begin():
        return await repository.claim_run(session, lease_s=settings.run_lease_s)


async def execute(sessionmaker: async_sessionmaker[AsyncSession], run: repository.RunRow, *,
                  settings: Settings) -> str:
    """Run one claimed run to its end; returns the outcome (completed, failed, retry)."""
    token = context.start(actor="job:reconciliation-run", tenant_id=run.tenant_id,
                          correlation_id=run.correlation_id or str(run.id), causation_id=str(run.id))

    async def progress(stage: str, *, lines: int | None = None, matched: int | None = None) -> None:
        # Its own short transaction: visible to GET /runs/{id} while the run's is open.
        async with sessionmaker() as session, session.begin():
            await repository.record_progress(session, run_id=run.id, stage=stage, lease_s=settings.run_lease_s,
                                             lines=lines, matched=matched)

    try:
        with RUN_SECONDS.time():
            async with UnitOfWork(sessionmaker) as uow:
                await service.execute_run(uow=uow, run=run, work_mem_mb=settings.run_work_mem_mb, progress=progress)
        RUNS.labels("completed").inc()
        return "completed"
    except Exception as exc:
        if is_transient(exc):
            RUNS.labels("retry").inc()
            log.warning("run %s: %s; queued again", run.id, type(exc).__name__)
            await _requeue(sessionmaker, run)
            return "retry"
        log.exception("run %s failed", run.id, extra={"run_id": str(run.id)})
        await run_in_transaction(sessionmaker, lambda uow: service.fail_run(uow=uow, run=run,
                                                                            error_code="internal_error"))
        RUNS.labels("failed").inc()
        return "failed"
    finally:
        context.reset(token)


async def _requeue(sessionmaker: async_sessionmaker[AsyncSession], run: repository.RunRow) -> None:
    """Back in the queue at once if the database answers; else its lease runs out."""
    try:
        async with sessionmaker() as session, session.begin():
            await repository.requeue_run(session, run_id=run.id)
    except Exception as exc:  # the database is away: the lease brings the run back later
        log.warning("run %s could not be queued again (%s); its lease will", run.id, type(exc).__name__)


async def run_once(sessionmaker: async_sessionmaker[AsyncSession], *, settings: Settings) -> uuid.UUID | None:
    """Claim and execute at most one run; its id, or None when nothing was queued."""
    run = await claim(sessionmaker, settings=settings)
    if run is None:
        return None
    await execute(sessionmaker, run, settings=settings)
    return run.id


async def run_jobs(*, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession],
                   stop: asyncio.Event) -> None:
    """The job loop: runs back to back while there are any, else a look every
    `run_poll_interval_s`, until `stop` is set."""
    while not stop.is_set():
        try:
            if await run_once(sessionmaker, settings=settings) is not None:
                continue
        except Exception as exc:
            # Nothing of a failed round committed; the next round retries. A job failure
            # must not take the read-model consumer in the same process down with it.
            JOB_FAILURES.labels("transient" if is_transient(exc) else "error").inc()
            log.warning("reconciliation run loop: %s; retrying", type(exc).__name__, exc_info=not is_transient(exc))
        try:
            await asyncio.wait_for(stop.wait(), timeout=settings.run_poll_interval_s)
        except asyncio.TimeoutError:
            pass
