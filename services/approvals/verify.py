"""`verify(database_url)`: the approvals service's part of `clearhouse verify`.

Checks, in one read-only REPEATABLE READ snapshot of the service's own database:

- invariant 4: no granted request lacks its required number of distinct approvals by
  principals other than its maker; no decision by the maker exists at all; no granted
  request was also rejected; no rejected request lacks its one rejection;
- invariant 5: requests, decisions and policy versions equal their rebuild from the event
  log, and no request reached two outcomes in the log.

Returns the violations as sentences (empty: all is well). It must never write.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import asyncpg
import orjson

from services.approvals.domain import (
    AGGREGATE, POLICY_AGGREGATE, ApprovalRequest, ApprovalStatus, DecisionRecord, LoggedEvent, Policy, Rule, Verdict,
    quorum_problems, rebuild,
)
from shared.db import plain_url

_EVENTS = """
    SELECT type, aggregate_id, tenant_id, payload::text AS payload, occurred_at, correlation_id, reason
    FROM events WHERE aggregate_type = ANY($1::text[]) ORDER BY seq
"""
_REQUESTS = "SELECT *, metadata::text AS metadata_json FROM approval_requests"
_DECISIONS = "SELECT * FROM approval_decisions ORDER BY decided_at, id"
_POLICY_VERSIONS = "SELECT *, rules::text AS rules_json FROM approval_policy_versions"
_POLICY_HEADERS = "SELECT id, tenant_id, subject_type, current_version FROM approval_policies"


async def verify(database_url: str) -> list[str]:
    conn = await asyncpg.connect(plain_url(database_url), server_settings={"application_name": "approvals-verify"})
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            events = [_logged(row) async for row in conn.cursor(_EVENTS, [AGGREGATE, POLICY_AGGREGATE],
                                                                  prefetch=2000)]
            requests, orphans = await _stored_requests(conn)
            versions = [_stored_policy(row) for row in await conn.fetch(_POLICY_VERSIONS)]
            headers = await conn.fetch(_POLICY_HEADERS)
    finally:
        await conn.close()

    problems: list[str] = list(orphans)
    for request in requests.values():
        problems += quorum_problems(request)
    rebuilt = rebuild(events)
    problems += rebuilt.problems
    problems += _compare_requests(requests, rebuilt.requests)
    problems += _compare_policies(versions, headers, rebuilt.policies)
    return problems


def _logged(row: asyncpg.Record) -> LoggedEvent:
    return LoggedEvent(type=row["type"], aggregate_id=row["aggregate_id"], tenant_id=row["tenant_id"],
                       payload=orjson.loads(row["payload"]), occurred_at=row["occurred_at"],
                       correlation_id=row["correlation_id"], reason=row["reason"])


async def _stored_requests(conn: asyncpg.Connection) -> tuple[dict[uuid.UUID, ApprovalRequest], list[str]]:
    orphans: list[str] = []
    requests: dict[uuid.UUID, ApprovalRequest] = {}
    for row in await conn.fetch(_REQUESTS):
        requests[row["id"]] = ApprovalRequest(
            id=row["id"], tenant_id=row["tenant_id"], subject_type=row["subject_type"], subject_id=row["subject_id"],
            amount=row["amount"], currency=row["currency"], metadata=orjson.loads(row["metadata_json"]),
            maker=row["maker"], requested_by=row["requested_by"], policy_id=row["policy_id"],
            policy_version=row["policy_version"], rule=row["rule"], required_approvals=row["required_approvals"],
            approver_scopes=tuple(row["approver_scopes"]), approver_principals=tuple(row["approver_principals"]),
            status=ApprovalStatus(row["status"]), created_at=row["created_at"], expires_at=row["expires_at"],
            escalate_at=row["escalate_at"], escalated_at=row["escalated_at"], resolved_at=row["resolved_at"],
            correlation_id=row["correlation_id"],
        )
    for row in await conn.fetch(_DECISIONS):
        request = requests.get(row["request_id"])
        if request is None or request.tenant_id != row["tenant_id"]:
            # The foreign key and the decisions trigger make this impossible; say so if not.
            orphans.append(f"decision {row['id']}: no request {row['request_id']} in tenant {row['tenant_id']}")
            continue
        request.decisions.append(DecisionRecord(
            id=row["id"], principal=row["principal"], verdict=Verdict(row["decision"]), reason=row["reason"],
            decided_at=row["decided_at"], correlation_id=row["correlation_id"]))
    return requests, orphans


def _stored_policy(row: asyncpg.Record) -> Policy:
    return Policy(id=row["policy_id"], tenant_id=row["tenant_id"], subject_type=row["subject_type"],
                  version=row["version"], rules=tuple(Rule.from_document(r) for r in orjson.loads(row["rules_json"])),
                  expire_after_seconds=row["expire_after_seconds"],
                  escalate_after_seconds=row["escalate_after_seconds"], created_by=row["created_by"],
                  reason=row["reason"], created_at=row["created_at"])


def _request_state(request: ApprovalRequest) -> dict[str, Any]:
    decisions = sorted((str(d.id), d.principal, d.verdict.value, d.reason, d.decided_at, d.correlation_id)
                       for d in request.decisions)
    return {
        "tenant_id": request.tenant_id, "subject_type": request.subject_type, "subject_id": request.subject_id,
        "amount": request.amount, "currency": request.currency, "metadata": request.metadata,
        "maker": request.maker, "requested_by": request.requested_by, "policy_id": request.policy_id,
        "policy_version": request.policy_version, "rule": request.rule,
        "required_approvals": request.required_approvals, "approver_scopes": request.approver_scopes,
        "approver_principals": request.approver_principals, "status": request.status,
        "created_at": request.created_at, "expires_at": request.expires_at, "escalate_at": request.escalate_at,
        "escalated_at": request.escalated_at, "resolved_at": request.resolved_at,
        "correlation_id": request.correlation_id, "decisions": decisions,
    }


def _compare_requests(stored: dict[uuid.UUID, ApprovalRequest],
                      rebuilt: dict[uuid.UUID, ApprovalRequest]) -> list[str]:
    problems = []
    for approval_id in sorted(stored.keys() - rebuilt.keys(), key=str):
        problems.append(f"approval {approval_id}: in the table but never opened in the event log")
    for approval_id in sorted(rebuilt.keys() - stored.keys(), key=str):
        problems.append(f"approval {approval_id}: opened in the event log but missing from the table")
    for approval_id in sorted(stored.keys() & rebuilt.keys(), key=str):
        table, log = _request_state(stored[approval_id]), _request_state(rebuilt[approval_id])
        differing = sorted(key for key in table if table[key] != log[key])
        if differing:
            problems.append(f"approval {approval_id}: the table differs from the rebuild of its events in "
                            f"{', '.join(differing)}")
    return problems


def _compare_policies(stored: Iterable[Policy], headers: Iterable[asyncpg.Record],
                      rebuilt: dict[uuid.UUID, dict[int, Policy]]) -> list[str]:
    problems = []
    table = {(p.id, p.version): p for p in stored}
    log = {(policy_id, version): p for policy_id, versions in rebuilt.items() for version, p in versions.items()}
    for key in sorted(table.keys() ^ log.keys(), key=str):
        where = "the table" if key in table else "the event log"
        problems.append(f"policy {key[0]} version {key[1]}: only in {where}")
    for key in sorted(table.keys() & log.keys(), key=str):
        if table[key] != log[key]:
            problems.append(f"policy {key[0]} version {key[1]}: the table differs from its approval_policy.changed")
    for header in headers:
        versions = rebuilt.get(header["id"], {})
        latest = max(versions, default=None)
        if header["current_version"] != latest:
            problems.append(f"policy {header['id']}: current version {header['current_version']}, "
                            f"the event log says {latest}")
    return problems
