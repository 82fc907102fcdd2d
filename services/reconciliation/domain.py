"""The language of reconciliation, with no I/O: match rules and their parameters, break
types, the life of a run and of a break, and the events they record.

    run:    queued ──claim──▶ running ──▶ completed
                                 └──────▶ failed        (a crashed worker's run is claimed again)
    break:  open ──resolve (person, reason, resolution)──▶ resolved
              └──── cleared by a later run of the same statement ──▶ resolved (cleared_by_run)

A payment is reconciled only when three sources agree to the cent: payments (it settled),
the ledger (it posted the money) and the statement (the bank or processor moved it).
Nothing here may decide that two amounts "nearly" agree except through a tenant's
explicit tolerance, and that decision is always recorded with the rule and a confidence.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone
from enum import StrEnum
from typing import Any

from shared.events import DomainEvent
from shared.errors import Conflict, NotFound, ValidationFailed


class BreakType(StrEnum):
    MISSING_IN_STATEMENT = "missing_in_statement"  # payments and/or ledger say it moved; the bank does not
    MISSING_IN_LEDGER = "missing_in_ledger"  # settled (and on the statement) but the ledger never posted it
    MISSING_IN_PAYMENTS = "missing_in_payments"  # the bank or the ledger moved money payments knows nothing of
    AMOUNT_MISMATCH = "amount_mismatch"  # same payment, different amounts (or directions)
    CURRENCY_MISMATCH = "currency_mismatch"
    DUPLICATE = "duplicate"  # reported (or posted) twice


class MatchRule(StrEnum):
    EXACT = "exact"  # reference + amount + currency (+ direction)
    TOLERANCE = "tolerance"  # reference + amount within drift + value date within window
    ONE_TO_MANY = "one_to_many"  # one statement entry against several payments
    FUZZY = "fuzzy"  # a reference that is nearly the payment's id, amount and date agreeing
    MANUAL = "manual"  # a person's decision, audited


PASS_ORDER = (MatchRule.EXACT, MatchRule.TOLERANCE, MatchRule.ONE_TO_MANY, MatchRule.FUZZY)


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class Resolution(StrEnum):
    """What a person decided about a break."""

    ACCEPTED = "accepted"  # a known, explained difference (fees, timing); no action
    WRITTEN_OFF = "written_off"
    CORRECTED_UPSTREAM = "corrected_upstream"  # fixed in payments or the ledger; a re-run will confirm
    MANUAL_MATCH = "manual_match"  # this line is that payment: recorded as a manual match
    FALSE_POSITIVE = "false_positive"


AUTO_RESOLUTIONS = frozenset({"cleared_by_run", "matched_in_other_statement"})

SETTLED_STATUSES = ("settled", "partially_refunded", "refunded")
# Rank of a payment status, for events without a producer seq (never regress to a lower rank).
STATUS_RANK = {"pending_approval": 1, "approved": 2, "rejected": 3, "submitted": 3, "cancelled": 4, "failed": 4,
               "settled": 5, "partially_refunded": 6, "refunded": 7}


class ReconciliationError(ValidationFailed):
    code = "reconciliation_invalid"


class StatementNotFound(NotFound):
    code = "statement_not_found"
    title = "Statement not found"


class RunNotFound(NotFound):
    code = "run_not_found"
    title = "Run not found"


class BreakNotFound(NotFound):
    code = "break_not_found"
    title = "Break not found"


class BreakAlreadyResolved(Conflict):
    code = "break_already_resolved"
    title = "Break already resolved"


class ManualMatchRefused(Conflict):
    code = "manual_match_refused"
    title = "Manual match refused"


@dataclass(frozen=True)
class Rules:
    """A tenant's matching parameters. Amount tolerances are 0 by default: the default is
    to the cent, and only the value date may drift."""

    amount_tolerance_minor: int = 0  # absolute drift, in minor units of the line's currency
    amount_tolerance_bps: int = 0  # relative drift, in basis points of the payment's amount
    date_window_days: int = 2
    one_to_many: bool = True
    fuzzy: bool = True
    fuzzy_max_distance: int = 2  # edits between a reference and a payment id (32 hex digits)
    fuzzy_min_prefix: int = 16  # a truncated reference must keep at least this many digits

    def as_dict(self) -> dict[str, Any]:
        return {"amount_tolerance_minor": self.amount_tolerance_minor,
                "amount_tolerance_bps": self.amount_tolerance_bps, "date_window_days": self.date_window_days,
                "one_to_many": self.one_to_many, "fuzzy": self.fuzzy,
                "fuzzy_max_distance": self.fuzzy_max_distance, "fuzzy_min_prefix": self.fuzzy_min_prefix}

    @classmethod
    def of(cls, stored: dict[str, Any] | None) -> Rules:
        known = {k: v for k, v in (stored or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def passes(self) -> list[MatchRule]:
        return [rule for rule in PASS_ORDER
                if not (rule is MatchRule.ONE_TO_MANY and not self.one_to_many)
                and not (rule is MatchRule.FUZZY and not self.fuzzy)]


def within_tolerance(*, rules: Rules, expected: int, actual: int) -> bool:
    """The amount drift the tenant accepts between a payment and its line (pure mirror of
    the SQL tolerance pass, for tests and documentation)."""
    drift = abs(expected - actual)
    return drift <= max(rules.amount_tolerance_minor, expected * rules.amount_tolerance_bps // 10_000)


def tolerance_confidence(*, expected: int, actual: int, days: int, window: int) -> float:
    """1.0 for a perfect agreement, falling with the relative amount drift and the days of
    value-date drift; never below 0.5 for anything the tolerance pass accepts."""
    amount_part = min(abs(expected - actual) / expected, 1.0) if expected else 1.0
    date_part = (abs(days) / (window + 1)) if window >= 0 else 1.0
    return round(max(0.5, 0.99 - 0.25 * amount_part - 0.2 * date_part), 3)


def age_days(*, opened_at: datetime, now: datetime | None = None) -> int:
    now = now or datetime.now(timezone.utc)
    return max(0, (now - opened_at).days)


def ageing_bucket(days: int) -> str:
    """The buckets treasury teams report breaks in."""
    if days < 1:
        return "0d"
    if days <= 3:
        return "1-3d"
    if days <= 7:
        return "4-7d"
    if days <= 30:
        return "8-30d"
    return ">30d"


# ── events (payloads per docs/events.md; schemas in schemas.EVENT_SCHEMAS) ───────────


def statement_imported_event(*, tenant_id: str, statement_id: uuid.UUID, fmt: str, lines: int, sha256: str,
                             period_start: date, period_end: date) -> DomainEvent:
    return DomainEvent("reconciliation.statement.imported.v1", "statement", str(statement_id),
                       {"statement_id": str(statement_id), "format": fmt, "lines": lines, "sha256": sha256,
                        "period_start": period_start.isoformat(), "period_end": period_end.isoformat()},
                       tenant_id=tenant_id)


def run_requested_event(*, tenant_id: str, run_id: uuid.UUID, statement_id: uuid.UUID) -> DomainEvent:
    return DomainEvent("reconciliation.run.requested.v1", "run", str(run_id),
                       {"run_id": str(run_id), "statement_id": str(statement_id)}, tenant_id=tenant_id)


def run_completed_event(*, tenant_id: str, run_id: uuid.UUID, statement_id: uuid.UUID, matched: int, breaks: int,
                        lines: int, breaks_opened: int, breaks_resolved: int, stats: dict[str, int]) -> DomainEvent:
    return DomainEvent("reconciliation.run.completed.v1", "run", str(run_id),
                       {"run_id": str(run_id), "statement_id": str(statement_id), "matched": matched,
                        "breaks": breaks, "lines": lines, "breaks_opened": breaks_opened,
                        "breaks_resolved": breaks_resolved, "by_rule": stats},
                       tenant_id=tenant_id, actor="job:reconciliation-run")


def run_failed_event(*, tenant_id: str, run_id: uuid.UUID, statement_id: uuid.UUID, error_code: str) -> DomainEvent:
    return DomainEvent("reconciliation.run.failed.v1", "run", str(run_id),
                       {"run_id": str(run_id), "statement_id": str(statement_id), "error_code": error_code},
                       tenant_id=tenant_id, actor="job:reconciliation-run")


def break_resolved_event(*, tenant_id: str, break_id: uuid.UUID, resolution: str, reason: str, resolved_by: str,
                         payment_id: uuid.UUID | None, break_type: str,
                         match: dict[str, Any] | None = None) -> DomainEvent:
    payload: dict[str, Any] = {"break_id": str(break_id), "type": break_type, "resolution": resolution,
                               "reason": reason, "resolved_by": resolved_by,
                               "payment_id": str(payment_id) if payment_id else None}
    if match:
        payload["match"] = match
    return DomainEvent("reconciliation.break.resolved.v1", "break", str(break_id), payload, tenant_id=tenant_id,
                       reason=reason)


def rules_updated_event(*, tenant_id: str, rules: Rules, version: int) -> DomainEvent:
    return DomainEvent("reconciliation.rules.updated.v1", "rules", tenant_id,
                       {"rules": rules.as_dict(), "version": version}, tenant_id=tenant_id)
