"""Use cases of the reconciliation service. They run inside a unit of work and never
commit; the domain errors a route may answer with are declared here or in `domain.py`.

    import_statement   a spooled upload → lines COPYed, the statement row, its event
    request_run        a queued run (or the statement's active one)
    execute_run        the job's side: reconcile, complete, publish (see matching.py)
    resolve_break      a person's decision, audited, optionally a manual match
    apply_*            the read model of payments and the ledger, from their events

Nothing here reads another service's database: payments and the ledger are known only
through the events they publish.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import BinaryIO

from sqlalchemy.ext.asyncio import AsyncSession

from services.reconciliation import matching, repository
from services.reconciliation.domain import (
    STATUS_RANK, BreakAlreadyResolved, BreakNotFound, ManualMatchRefused, ReconciliationError, Resolution, Rules,
    RunNotFound, StatementNotFound, ageing_bucket, age_days, break_resolved_event, run_completed_event,
    run_failed_event, run_requested_event, rules_updated_event, statement_imported_event,
)
from services.reconciliation.schemas import (
    BreakFilters, BreakPublic, BreakResolve, PaymentEventIn, RulesPublic, TransactionPostedIn,
)
from services.reconciliation.statements import StatementLine, StatementRejected, StatementSummary, parse
from shared import context
from shared.errors import BadRequest, ValidationFailed
from shared.uow import UnitOfWork, current_traceparent

log = logging.getLogger(__name__)


class StatementInvalid(ValidationFailed):
    """A refused statement file. The problem's `code` is the parser's (e.g.
    too_many_decimals, unknown_currency, malformed_xml) and `line` / `element` /
    `column` say where."""

    code = "statement_invalid"
    title = "Statement refused"

    def __init__(self, rejection: StatementRejected) -> None:
        super().__init__(rejection.detail, **rejection.where())
        self.code = rejection.code  # the parser's stable code, per occurrence


class InvalidCursor(BadRequest):
    code = "invalid_cursor"
    title = "Invalid cursor"


class DuplicateStatement(Exception):
    """Not an error for the caller: the same file was uploaded before (same sha256)."""

    def __init__(self, statement: repository.StatementRow) -> None:
        super().__init__(str(statement.id))
        self.statement = statement


def parse_id(value: str, error: type[Exception]) -> uuid.UUID:
    """An id from a path or body; anything that is not a UUID names nothing, so it is a 404."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise error("No such object.") from None


# ── statements ───────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Upload:
    """A request body spooled to a temporary file, with its digest."""

    file: BinaryIO
    sha256: bytes
    size: int


def _copy_text(value: str) -> str:
    # COPY text format: backslash is the escape character. References were checked to be
    # printable (no tabs or newlines), so the backslash is all there is to escape.
    return value.replace("\\", "\\\\") if "\\" in value else value


_NULL = "\\N"  # COPY text format's NULL
# Below this, autovacuum's statistics are good enough; above it, a run planned on stale
# statistics would choose index probes over hash joins for the whole statement.
ANALYZE_AFTER_LINES = 10_000


def encode_lines(batch: list[StatementLine], *, prefix: str) -> bytes:
    """One COPY text row per line; `prefix` carries tenant, statement and partition day."""
    null = _NULL
    days: dict = {None: null}  # a statement has few distinct dates: format each once
    rows = []
    append = rows.append
    for line_no, entry_no, source_line, value_date, booking_date, direction, amount, entry_amount, currency, \
            reference, ref_uuid, bank_ref in batch:
        value_text = days.get(value_date) or days.setdefault(value_date, value_date.isoformat())
        booking_text = days.get(booking_date) or days.setdefault(booking_date, booking_date.isoformat())
        # The reference is stored as text only when it says more than its UUID (most
        # references are the payment id as is): a fifth of the bytes COPY and WAL carry.
        append(f"{prefix}{line_no}\t{entry_no}\t{null if source_line is None else source_line}\t{value_text}\t"
               f"{booking_text}\t{direction}\t{null if amount is None else amount}\t{entry_amount}\t{currency}\t"
               f"{null if reference is None or reference == ref_uuid else _copy_text(reference)}\t{ref_uuid or null}\t"
               f"{null if bank_ref is None else _copy_text(bank_ref)}\n")
    return "".join(rows).encode()


async def _encoded_batches(batches: Iterator[list[StatementLine]], *, prefix: str) -> AsyncIterator[bytes]:
    """Parse and encode in a worker thread, a batch at a time, so the event loop keeps
    answering other requests while a large file streams into COPY."""

    def next_chunk() -> bytes | None:
        batch = next(batches, None)
        return None if batch is None else encode_lines(batch, prefix=prefix)

    while (chunk := await asyncio.to_thread(next_chunk)) is not None:
        yield chunk


async def prepare_statement_storage(*, session: AsyncSession, received_on: date) -> None:
    """The month's partition of statement lines, in its own short transaction: creating a
    partition locks the parent table, which an upload's long COPY must not hold."""
    await repository.ensure_statement_partition(session, day=received_on)


async def import_statement(*, uow: UnitOfWork, tenant_id: str, created_by: str, fmt: str, upload: Upload,
                           received_on: date) -> repository.StatementRow:
    """Store a statement and all its lines, or nothing. Raises DuplicateStatement when the
    tenant uploaded this exact file before, StatementInvalid when it is malformed."""
    session = uow.session
    existing = await repository.statement_by_hash(session, tenant_id=tenant_id, sha256=upload.sha256)
    if existing is not None:
        raise DuplicateStatement(existing)
    statement_id = uuid.uuid4()
    summary = StatementSummary(format=fmt)
    upload.file.seek(0)
    tenant = tenant_id.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    prefix = f"{tenant}\t{statement_id}\t{received_on}\t"
    try:
        await repository.copy_statement_lines(
            session, _encoded_batches(parse(fmt, upload.file, summary), prefix=prefix))
    except StatementRejected as rejection:
        raise StatementInvalid(rejection) from None
    if summary.lines >= ANALYZE_AFTER_LINES:
        # Its own rows counted (same transaction): a run planned right after sees them.
        await repository.analyze_statement_lines(session, day=received_on)
    statement = await repository.insert_statement(
        session, statement_id=statement_id, tenant_id=tenant_id, fmt=fmt, sha256=upload.sha256,
        size_bytes=upload.size, line_count=summary.lines, skipped_count=summary.skipped,
        period_start=summary.period_start, period_end=summary.period_end, received_on=received_on,
        account=summary.account, currencies=sorted(summary.currencies), created_by=created_by)
    uow.add(statement_imported_event(tenant_id=tenant_id, statement_id=statement_id, fmt=fmt, lines=summary.lines,
                                     sha256=upload.sha256.hex(), period_start=statement.period_start,
                                     period_end=statement.period_end))
    return statement


async def get_statement(*, session: AsyncSession, tenant_id: str, statement_id: str) -> repository.StatementRow:
    found = await repository.get_statement(session, tenant_id=tenant_id,
                                           statement_id=parse_id(statement_id, StatementNotFound))
    if found is None:
        raise StatementNotFound("No such statement.")
    return found


async def statement_by_hash(*, session: AsyncSession, tenant_id: str, sha256: bytes) -> repository.StatementRow | None:
    return await repository.statement_by_hash(session, tenant_id=tenant_id, sha256=sha256)


# ── rules ────────────────────────────────────────────────────────────────────────────


async def get_rules(*, session: AsyncSession, tenant_id: str) -> tuple[Rules, int]:
    stored, version = await repository.get_rules(session, tenant_id=tenant_id)
    return Rules.of(stored), version


async def put_rules(*, uow: UnitOfWork, tenant_id: str, updated_by: str, rules: RulesPublic) -> tuple[Rules, int]:
    chosen = rules.to_rules()
    version = await repository.put_rules(uow.session, tenant_id=tenant_id, rules=chosen.as_dict(),
                                         updated_by=updated_by)
    uow.add(rules_updated_event(tenant_id=tenant_id, rules=chosen, version=version))
    return chosen, version


# ── runs ─────────────────────────────────────────────────────────────────────────────


async def request_run(*, uow: UnitOfWork, tenant_id: str, requested_by: str, statement_id: str) -> repository.RunRow:
    """A queued run of the statement, with the tenant's rules as they are now; when the
    statement already has a queued or running run, that run."""
    session = uow.session
    statement = await get_statement(session=session, tenant_id=tenant_id, statement_id=statement_id)
    active = await repository.active_run(session, tenant_id=tenant_id, statement_id=statement.id)
    if active is not None:
        return active
    rules, _ = await get_rules(session=session, tenant_id=tenant_id)
    run_id = uuid.uuid4()
    ctx = context.current()
    run = await repository.insert_run(session, run_id=run_id, tenant_id=tenant_id, statement_id=statement.id,
                                      rules=rules.as_dict(), requested_by=requested_by,
                                      correlation_id=ctx.correlation_id, traceparent=current_traceparent())
    if run is None:  # another request queued one between our look and our insert
        run = await repository.active_run(session, tenant_id=tenant_id, statement_id=statement.id)
        if run is None:
            raise ReconciliationError("The statement's run could not be queued; retry.")
        return run
    uow.add(run_requested_event(tenant_id=tenant_id, run_id=run_id, statement_id=statement.id))
    return run


async def get_run(*, session: AsyncSession, tenant_id: str, run_id: str) -> repository.RunRow:
    found = await repository.get_run(session, tenant_id=tenant_id, run_id=parse_id(run_id, RunNotFound))
    if found is None:
        raise RunNotFound("No such run.")
    return found


async def list_runs(*, session: AsyncSession, tenant_id: str, status: str | None, cursor: str | None,
                    limit: int) -> tuple[list[repository.RunRow], str | None]:
    """The tenant's runs, newest first, a page at a time (the console's run list)."""
    before = _decode_cursor(cursor) if cursor else None
    rows = await repository.list_runs(session, tenant_id=tenant_id, status=status, before=before, limit=limit + 1)
    page = rows[:limit]
    if len(rows) <= limit:
        return page, None
    raw = f"{page[-1].created_at.isoformat()}|{page[-1].id}".encode()
    return page, base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def execute_run(*, uow: UnitOfWork, run: repository.RunRow, work_mem_mb: int,
                      progress: matching.Progress) -> matching.RunOutcome:
    """Reconcile the run's statement and complete the run, in the unit of work's
    transaction (the job commits it). The statement and read model are the tenant's."""
    session = uow.session
    statement = await repository.get_statement(session, tenant_id=run.tenant_id, statement_id=run.statement_id)
    if statement is None:  # cannot happen (foreign key); a run must still never crash the job on it
        raise ReconciliationError(f"run {run.id}: statement {run.statement_id} not found")
    scope = matching.RunScope(run_id=run.id, tenant_id=run.tenant_id, statement_id=statement.id,
                              received_on=statement.received_on, period_start=statement.period_start,
                              period_end=statement.period_end, correlation_id=run.correlation_id,
                              traceparent=run.traceparent or current_traceparent(), format=statement.format,
                              lines=statement.line_count)
    outcome = await matching.reconcile(session=session, scope=scope, rules=Rules.of(run.rules),
                                       work_mem_mb=work_mem_mb, progress=progress)
    await repository.complete_run(session, run_id=run.id, lines=outcome.lines, matched=outcome.matched,
                                  breaks=outcome.breaks, breaks_opened=outcome.breaks_opened,
                                  breaks_resolved=outcome.breaks_resolved,
                                  stats={"by_rule": outcome.by_rule, "seconds": outcome.seconds})
    uow.add(run_completed_event(tenant_id=run.tenant_id, run_id=run.id, statement_id=statement.id,
                                matched=outcome.matched, breaks=outcome.breaks, lines=outcome.lines,
                                breaks_opened=outcome.breaks_opened, breaks_resolved=outcome.breaks_resolved,
                                stats=outcome.by_rule))
    return outcome


async def fail_run(*, uow: UnitOfWork, run: repository.RunRow, error_code: str) -> None:
    failed = await repository.fail_run(uow.session, run_id=run.id, error_code=error_code)
    if failed is not None:
        uow.add(run_failed_event(tenant_id=run.tenant_id, run_id=run.id, statement_id=run.statement_id,
                                 error_code=error_code))


async def fail_exhausted_runs(*, uow: UnitOfWork, max_attempts: int) -> int:
    failed = await repository.fail_exhausted_runs(uow.session, max_attempts=max_attempts)
    for run in failed:
        uow.add(run_failed_event(tenant_id=run.tenant_id, run_id=run.id, statement_id=run.statement_id,
                                 error_code="attempts_exhausted"))
    return len(failed)


# ── breaks ───────────────────────────────────────────────────────────────────────────


def break_public(row: repository.BreakRow, *, now: datetime | None = None) -> BreakPublic:
    days = age_days(opened_at=row.opened_at, now=now)
    return BreakPublic(id=row.id, type=row.type, status=row.status, source=row.source, amount=row.amount,
                       expected_amount=row.expected_amount, currency=row.currency,
                       expected_currency=row.expected_currency, reference=row.reference, payment_id=row.payment_id,
                       target_id=row.target_id, statement_id=row.statement_id, line_no=row.line_no,
                       run_id=row.run_id, last_run_id=row.last_run_id, value_date=row.value_date, detail=row.detail,
                       opened_at=row.opened_at, age_days=days, ageing_bucket=ageing_bucket(days),
                       resolved_at=row.resolved_at, resolved_by=row.resolved_by, resolution=row.resolution,
                       resolution_reason=row.resolution_reason)


def _encode_cursor(row: repository.BreakRow) -> str:
    raw = f"{row.opened_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        opened_at, _, break_id = raw.partition("|")
        parsed = datetime.fromisoformat(opened_at)
        if parsed.tzinfo is None:
            raise ValueError
        return parsed, uuid.UUID(break_id)
    except (ValueError, UnicodeDecodeError):
        raise InvalidCursor("The cursor is not one this API returned.") from None


async def list_breaks(*, session: AsyncSession, tenant_id: str, filters: BreakFilters
                      ) -> tuple[list[repository.BreakRow], str | None]:
    after = _decode_cursor(filters.cursor) if filters.cursor else None
    rows = await repository.list_breaks(session, tenant_id=tenant_id, run_id=filters.run_id, status=filters.status,
                                        break_type=str(filters.type) if filters.type else None,
                                        statement_id=filters.statement_id, after=after, limit=filters.limit + 1)
    page = rows[:filters.limit]
    return page, (_encode_cursor(page[-1]) if len(rows) > filters.limit else None)


async def get_break(*, session: AsyncSession, tenant_id: str, break_id: str) -> repository.BreakRow:
    found = await repository.get_break(session, tenant_id=tenant_id, break_id=parse_id(break_id, BreakNotFound))
    if found is None:
        raise BreakNotFound("No such break.")
    return found


async def resolve_break(*, uow: UnitOfWork, tenant_id: str, principal: str, break_id: str,
                        request: BreakResolve) -> list[repository.BreakRow]:
    """A person resolves a break, with a reason; audited as `break.resolved` with who did
    it. A manual match also records the match (rule manual) and resolves every other
    open break of the statement that the match explains."""
    session = uow.session
    found = await repository.get_break(session, tenant_id=tenant_id, break_id=parse_id(break_id, BreakNotFound),
                                       lock=True)
    if found is None:
        raise BreakNotFound("No such break.")
    if found.status != "open":
        raise BreakAlreadyResolved(f"The break was already resolved ({found.resolution}).",
                                   resolution=found.resolution)
    actor = f"user:{principal}"
    ids = [found.id]
    match_payload = None
    if request.resolution is Resolution.MANUAL_MATCH:
        line_no, target = await _manual_match(session, tenant_id=tenant_id, found=found, request=request,
                                              principal=actor)
        ids += [i for i in await repository.open_breaks_touching(
            session, tenant_id=tenant_id, statement_id=found.statement_id, line_no=line_no,
            target_id=target.target_id) if i != found.id]
        match_payload = {"statement_id": str(found.statement_id), "line_no": line_no,
                         "target_id": str(target.target_id), "target_kind": target.target_kind,
                         "ledger": target.ledger}
    resolved = await repository.resolve_breaks(session, tenant_id=tenant_id, break_ids=ids,
                                               resolution=str(request.resolution), reason=request.reason,
                                               resolved_by=actor)
    for row in resolved:
        uow.add(break_resolved_event(tenant_id=tenant_id, break_id=row.id, resolution=str(request.resolution),
                                     reason=request.reason, resolved_by=actor, payment_id=row.payment_id,
                                     break_type=row.type, match=match_payload))
    resolved.sort(key=lambda row: row.id != found.id)  # the break asked about first
    return resolved


async def _manual_match(session: AsyncSession, *, tenant_id: str, found: repository.BreakRow, request: BreakResolve,
                        principal: str) -> tuple[int, repository.TargetRow]:
    match = request.match
    if found.source == "ledger":
        raise ManualMatchRefused("A ledger-side break is not about a statement line; resolve it otherwise.")
    line_no = found.line_no if found.line_no is not None else match.line_no
    target_id = match.target_id if found.line_no is not None else found.target_id
    if line_no is None or target_id is None:
        raise ReconciliationError(
            "A manual match of a statement-side break names match.target_id; of a payment-side break, match.line_no.")
    # Serialise with runs and other manual matches of the tenant: the checks below (line
    # not matched, payment not matched) then hold until this transaction commits.
    await repository.lock_tenant_matching(session, tenant_id=tenant_id)
    statement = await repository.get_statement(session, tenant_id=tenant_id, statement_id=found.statement_id)
    line = await repository.get_line(session, tenant_id=tenant_id, statement=statement, line_no=line_no)
    if line is None:
        raise ManualMatchRefused(f"The statement has no line {line_no}.")
    target = await repository.get_target(session, tenant_id=tenant_id, target_id=target_id)
    if target is None:
        raise ManualMatchRefused("No payment or refund has this id.")
    if await repository.line_matched(session, statement_id=statement.id, line_no=line_no):
        raise ManualMatchRefused(f"Line {line_no} is already matched; a line is never matched twice.")
    if await repository.target_matched(session, tenant_id=tenant_id, target_id=target.target_id):
        raise ManualMatchRefused("This payment is already matched to a statement line.")
    amount = line.amount if line.amount is not None else line.entry_amount
    await repository.insert_manual_match(
        session, tenant_id=tenant_id, statement_id=statement.id, line_no=line_no, target=target,
        amount_difference=amount - (target.amount or 0),
        date_difference=(line.value_date - target.value_date).days if target.value_date else 0,
        matched_by=principal, reason=request.reason)
    return line_no, target


# ── read model (the consumers' side) ────────────────────────────────────────────────

_PAYMENT_STATUS_OF = {
    "payment.created.v1": "pending_approval", "payment.approved.v1": "approved", "payment.rejected.v1": "rejected",
    "payment.submitted.v1": "submitted", "payment.settled.v1": "settled", "payment.failed.v1": "failed",
    "payment.cancelled.v1": "cancelled", "payment.funds_reserved.v1": "approved",
}


def payment_fact(*, tenant_id: str, event_type: str, payload: PaymentEventIn, seq: int | None,
                 event_time: datetime | None) -> repository.PaymentFact:
    """What one payment event tells the read model. Without the producer's seq the status
    rank orders events instead (a settled payment never goes back to submitted)."""
    if event_type == "payment.refunded.v1":
        # Payments says which (the status rides on its events); the contract's fields alone
        # cannot tell, since a refund event carries the refund's amount, not the payment's.
        status = payload.status if payload.status in ("refunded", "partially_refunded") else "partially_refunded"
    elif payload.status in STATUS_RANK:
        status = payload.status  # payments sends the status after each transition
    else:
        status = _PAYMENT_STATUS_OF[event_type]
    refund = event_type == "payment.refunded.v1" and payload.refund_id is not None
    when = (event_time or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return repository.PaymentFact(
        tenant_id=tenant_id, payment_id=payload.payment_id,
        # a refund event's amount is the refund's, not the payment's
        amount=None if event_type == "payment.refunded.v1" else payload.amount,
        currency=payload.currency, debit_account_id=payload.debit_account_id, status=status,
        status_seq=seq if seq is not None else STATUS_RANK.get(status, 0),
        value_date=payload.value_date if event_type == "payment.settled.v1" else None,
        refunded_amount=payload.refunded_total or 0,
        refund_id=payload.refund_id if refund else None, refund_amount=payload.amount if refund else None,
        refund_value_date=(payload.value_date or when.date()) if refund else None)


async def apply_payment_event(*, uow: UnitOfWork, fact: repository.PaymentFact) -> None:
    await repository.apply_payment_fact(uow.session, fact)


def ledger_posting(*, tenant_id: str, transaction: TransactionPostedIn) -> repository.LedgerPosting | None:
    """The posting a ledger transaction makes for a payment: its posted debits (the
    amount that moved), negative for a reversal. None when it is not about a payment."""
    payment_id = _uuid_or_none(transaction.payment_id)
    if payment_id is None:
        return None
    currencies = {entry.currency for entry in transaction.entries}
    if len(currencies) != 1:
        raise ValueError(f"transaction {transaction.transaction_id} for payment {payment_id} posts "
                         f"{len(currencies)} currencies; a payment posting has exactly one")
    amount = sum(entry.amount for entry in transaction.entries if entry.direction == "debit")
    kind = transaction.kind or "standard"
    return repository.LedgerPosting(tenant_id=tenant_id, transaction_id=transaction.transaction_id,
                                    currency=currencies.pop(), payment_id=payment_id,
                                    amount=-amount if kind == "reversal" or transaction.reverses_id else amount,
                                    kind="reversal" if transaction.reverses_id else kind,
                                    posted_at=transaction.posted_at)


async def apply_ledger_posting(*, uow: UnitOfWork, posting: repository.LedgerPosting) -> None:
    await repository.apply_ledger_posting(uow.session, posting)


def _uuid_or_none(value: str | None) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None
