"""Request and response models of the reconciliation API, the payloads of the events it
publishes (`EVENT_SCHEMAS`, for the event catalogue) and of the events it consumes.

Requests are strict (unknown fields refused, no coercion); consumed events are lenient
(unknown fields ignored) but every field the read model relies on is checked.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, StringConstraints, model_validator

from services.reconciliation.domain import BreakType, Resolution, Rules
from shared.money import AmountMinor, CurrencyCode



def _storable(value: str) -> str:
    # PostgreSQL text cannot hold NUL and asyncpg cannot encode a lone surrogate (stdlib JSON
    # decodes "\ud800" into one): refuse both as a 422 here rather than fail with a 500 in the
    # database (found by tests/hostile).
    if "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode") from None
    return value


Reason = Annotated[str, Strict(), StringConstraints(strip_whitespace=True, min_length=1, max_length=500),
                   AfterValidator(_storable)]


class _Strict(BaseModel):
    # Unknown fields refused; numbers and booleans strict per field (FastAPI validates the
    # decoded JSON in Python mode, where model-wide strictness would refuse enum strings).
    model_config = ConfigDict(extra="forbid")


# ── statements ──────────────────────────────────────────────────────────────────────


class StatementPublic(BaseModel):
    id: uuid.UUID
    format: Literal["csv", "camt053", "mt940"]
    lines: int = Field(description="Statement lines stored (camt.053: one per TxDtls, or per Ntry without any)")
    skipped: int = Field(description="Entries not booked (camt.053 PDNG/INFO), not reconciled")
    sha256: str
    size_bytes: int
    period_start: date
    period_end: date
    account: str | None
    currencies: list[str]
    duplicate: bool = Field(description="True when this exact file was uploaded before: this is that statement")
    created_at: datetime

    @classmethod
    def of(cls, row, *, duplicate: bool = False) -> StatementPublic:
        return cls(id=row.id, format=row.format, lines=row.line_count, skipped=row.skipped_count, sha256=row.sha256,
                   size_bytes=row.size_bytes, period_start=row.period_start, period_end=row.period_end,
                   account=row.account, currencies=row.currencies, duplicate=duplicate, created_at=row.created_at)


# ── runs ─────────────────────────────────────────────────────────────────────────────


class RunCreate(_Strict):
    statement_id: Annotated[str, Strict(), StringConstraints(min_length=1, max_length=64)]


class RunPublic(BaseModel):
    id: uuid.UUID
    status: Literal["queued", "running", "completed", "failed"]
    statement_id: uuid.UUID
    stage: str | None = Field(description="The pass a running run is in (keyed, one_to_many, fuzzy, breaks)")
    lines: int | None
    matched: int = Field(description="Lines reconciled: payments, ledger and statement agree")
    breaks: int = Field(description="Open breaks of the statement after this run")
    breaks_opened: int
    breaks_resolved: int
    by_rule: dict[str, int] = Field(description="Matched lines per rule (exact, tolerance, one_to_many, fuzzy, manual)")
    stage_seconds: dict[str, float] = Field(description="Wall time of each stage of a completed run")
    rules: dict[str, Any]
    error_code: str | None
    attempts: int
    requested_by: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None

    @classmethod
    def of(cls, row) -> RunPublic:
        return cls(id=row.id, status=row.status, statement_id=row.statement_id, stage=row.stage, lines=row.lines,
                   matched=row.matched, breaks=row.breaks, breaks_opened=row.breaks_opened,
                   breaks_resolved=row.breaks_resolved, by_rule=(row.stats or {}).get("by_rule", {}),
                   stage_seconds=(row.stats or {}).get("seconds", {}), rules=row.rules,
                   error_code=row.error_code, attempts=row.attempts, requested_by=row.requested_by,
                   created_at=row.created_at, started_at=row.started_at, completed_at=row.completed_at)


class RunList(BaseModel):
    data: list[RunPublic]
    next_cursor: str | None


class RunFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["queued", "running", "completed", "failed"] | None = None
    limit: int = Field(default=50, ge=1, le=100)
    cursor: Annotated[str, StringConstraints(max_length=200)] | None = None


# ── breaks ───────────────────────────────────────────────────────────────────────────


class BreakFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_id: uuid.UUID | None = None
    statement_id: uuid.UUID | None = None
    status: Literal["open", "resolved"] | None = None
    type: BreakType | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: Annotated[str, StringConstraints(max_length=200)] | None = None


class BreakPublic(BaseModel):
    id: uuid.UUID
    type: BreakType
    status: Literal["open", "resolved"]
    source: Literal["statement", "payments", "ledger"] = Field(
        description="Whose record is unexplained: a statement line, a payment, or a ledger posting")
    amount: int | None
    expected_amount: int | None
    currency: str | None
    expected_currency: str | None
    reference: str | None
    payment_id: uuid.UUID | None
    target_id: uuid.UUID | None
    statement_id: uuid.UUID
    line_no: int | None
    run_id: uuid.UUID = Field(description="The run that opened it")
    last_run_id: uuid.UUID = Field(description="The last run that found it")
    value_date: date | None
    detail: str
    opened_at: datetime
    age_days: int
    ageing_bucket: str
    resolved_at: datetime | None
    resolved_by: str | None
    resolution: str | None
    resolution_reason: str | None


class BreakList(BaseModel):
    data: list[BreakPublic]
    next_cursor: str | None


class ManualMatch(_Strict):
    """For a statement-side break: the payment (or refund) id the line is; for a
    payment-side break: the statement line number that is that payment."""

    target_id: uuid.UUID | None = None
    line_no: Annotated[int, Strict(), Field(gt=0, le=2_000_000_000)] | None = None


class BreakResolve(_Strict):
    resolution: Resolution
    reason: Reason
    match: ManualMatch | None = None

    @model_validator(mode="after")
    def _match_only_for_manual_match(self) -> BreakResolve:
        if (self.resolution is Resolution.MANUAL_MATCH) != (self.match is not None):
            raise ValueError("a manual_match resolution carries `match`, and only it does")
        return self


class BreakResolution(BaseModel):
    resolved: list[BreakPublic] = Field(description="The break, and any other open break the manual match explains")


# ── rules ────────────────────────────────────────────────────────────────────────────


class RulesPublic(_Strict):
    """A tenant's matching parameters. Passes run in priority order: exact, tolerance,
    one_to_many, fuzzy; exact always runs, the others can be switched off."""

    amount_tolerance_minor: Annotated[int, Strict(), Field(ge=0, le=1_000_000)] = 0
    amount_tolerance_bps: Annotated[int, Strict(), Field(ge=0, le=1_000)] = 0
    date_window_days: Annotated[int, Strict(), Field(ge=0, le=31)] = 2
    one_to_many: Annotated[bool, Strict()] = True
    fuzzy: Annotated[bool, Strict()] = True
    fuzzy_max_distance: Annotated[int, Strict(), Field(ge=0, le=8)] = 2
    fuzzy_min_prefix: Annotated[int, Strict(), Field(ge=8, le=32)] = 16

    def to_rules(self) -> Rules:
        return Rules(**self.model_dump())


class RulesEnvelope(BaseModel):
    rules: RulesPublic
    version: int


# ── consumed events (lenient: unknown fields ignored) ───────────────────────────────


class PaymentEventIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    payment_id: uuid.UUID
    amount: Annotated[int, Field(gt=0)] | None = None
    currency: CurrencyCode | None = None
    debit_account_id: Annotated[str, StringConstraints(max_length=200)] | None = None
    value_date: date | None = None
    status: str | None = None
    refund_id: uuid.UUID | None = None
    refunded_total: Annotated[int, Field(ge=0)] | None = None


class HoldPostedIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    payment_id: str
    transaction_id: uuid.UUID
    amount: AmountMinor
    currency: CurrencyCode
    posted_at: datetime


class EntryIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    direction: Literal["debit", "credit"]
    amount: AmountMinor
    currency: CurrencyCode


class TransactionPostedIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    transaction_id: uuid.UUID
    payment_id: str | None = None
    entries: list[EntryIn]
    posted_at: datetime
    kind: str | None = None
    reverses_id: uuid.UUID | None = None


# ── published events ─────────────────────────────────────────────────────────────────


class StatementImportedV1(BaseModel):
    statement_id: str
    format: str
    lines: int
    sha256: str
    period_start: str
    period_end: str


class RunRequestedV1(BaseModel):
    run_id: str
    statement_id: str


class RunCompletedV1(BaseModel):
    run_id: str
    statement_id: str
    matched: int
    breaks: int
    lines: int
    breaks_opened: int
    breaks_resolved: int
    by_rule: dict[str, int]


class RunFailedV1(BaseModel):
    run_id: str
    statement_id: str
    error_code: str


class BreakOpenedV1(BaseModel):
    break_id: str
    run_id: str
    statement_id: str
    type: BreakType
    amount: int | None
    expected_amount: int | None
    currency: str | None
    reference: str | None
    payment_id: str | None
    line_no: int | None
    source: str
    reopened: bool


class BreakResolvedV1(BaseModel):
    break_id: str
    type: BreakType
    resolution: str
    reason: str
    resolved_by: str
    payment_id: str | None
    match: dict[str, Any] | None = None
    run_id: str | None = None


class RulesUpdatedV1(BaseModel):
    rules: dict[str, Any]
    version: int


EVENT_SCHEMAS: dict[str, type[BaseModel]] = {
    "reconciliation.statement.imported.v1": StatementImportedV1,
    "reconciliation.run.requested.v1": RunRequestedV1,
    "reconciliation.run.completed.v1": RunCompletedV1,
    "reconciliation.run.failed.v1": RunFailedV1,
    "reconciliation.break.opened.v1": BreakOpenedV1,
    "reconciliation.break.resolved.v1": BreakResolvedV1,
    "reconciliation.rules.updated.v1": RulesUpdatedV1,
}
