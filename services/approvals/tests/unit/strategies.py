"""Hypothesis strategies for the approvals domain."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import strategies as st

from services.approvals import domain
from shared.money import CURRENCY_EXPONENTS

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
CURRENCIES = st.sampled_from(sorted(CURRENCY_EXPONENTS))
PRINCIPALS = ["ann", "bob", "cat", "dan", "eve", "maker", "filer"]
SCOPES = ["approvals:decide", "approvals:treasury", "approvals:board"]
NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)


@st.composite
def thresholds(draw) -> domain.AmountThreshold:
    minor = draw(st.dictionaries(CURRENCIES, st.integers(1, 10**9), max_size=3))
    major = draw(st.none() | st.integers(1, 10**6))
    if not minor and major is None:
        major = draw(st.integers(1, 10**6))
    return domain.AmountThreshold(minor_units=minor, whole_major_units=major)


@st.composite
def conditions(draw) -> domain.Conditions:
    return domain.Conditions(
        amount_at_least=draw(st.none() | thresholds()),
        amount_below=draw(st.none() | thresholds()),
        currencies=draw(st.none() | st.frozensets(CURRENCIES, min_size=1, max_size=3)),
        metadata=draw(st.none() | st.dictionaries(st.sampled_from(["category", "desk"]),
                                                  st.sampled_from(["payroll", "fx", "ops"]), min_size=1)),
        created_by=draw(st.none() | st.frozensets(st.sampled_from(PRINCIPALS), min_size=1, max_size=3)),
    )


@st.composite
def rules(draw, *, catch_all: bool = False, name: str | None = None) -> domain.Rule:
    required = draw(st.integers(0, 4))
    principals = draw(st.just(()) | st.lists(st.sampled_from(PRINCIPALS), min_size=max(required, 1), max_size=6,
                                             unique=True).map(tuple))
    return domain.Rule(
        name=name or draw(NAMES), required_approvals=required,
        conditions=domain.Conditions() if catch_all else draw(conditions()),
        approver_scopes=draw(st.just(()) | st.lists(st.sampled_from(SCOPES[1:]), min_size=1, max_size=2,
                                                    unique=True).map(tuple)),
        approver_principals=principals,
    )


@st.composite
def policies(draw, tenant_id: str = "t1", subject_type: str = "payment") -> domain.Policy:
    count = draw(st.integers(0, 4))
    body = [draw(rules(name=f"rule_{i}")) for i in range(count)]
    last = draw(rules(catch_all=True, name="otherwise"))
    expire = draw(st.none() | st.integers(domain.MIN_EXPIRY_S + 1, domain.MAX_EXPIRY_S))
    escalate = draw(st.none() | st.integers(domain.MIN_EXPIRY_S, expire - 1)) if expire else None
    return domain.Policy(id=domain.policy_id_for(tenant_id, subject_type), tenant_id=tenant_id,
                         subject_type=subject_type, version=draw(st.integers(1, 50)), rules=(*body, last),
                         expire_after_seconds=expire, escalate_after_seconds=escalate, created_by="admin",
                         reason="because", created_at=T0)


@st.composite
def subjects(draw, *, with_amount: bool | None = None) -> domain.Subject:
    has_amount = draw(st.booleans()) if with_amount is None else with_amount
    currency = draw(CURRENCIES) if has_amount else None
    return domain.Subject(
        tenant_id="t1", subject_type="payment", subject_id=draw(st.uuids()).hex,
        amount=draw(st.integers(1, 10**15)) if has_amount else None, currency=currency,
        metadata=draw(st.dictionaries(st.sampled_from(["category", "desk"]), st.sampled_from(["payroll", "fx", "ops"]))),
        maker="maker", requested_by=draw(st.sampled_from(["maker", "filer"])),
    )


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)
