"""Policy evaluation: the design's default in every currency's precision, first match wins,
conditions mean what they say, and a policy that could not decide every subject does not
exist."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from services.approvals import domain
from services.approvals.domain import AmountThreshold, Conditions, InvalidPolicy, Policy, Rule, Subject
from services.approvals.schemas import EVENT_SCHEMAS
from services.approvals.tests.unit.strategies import CURRENCIES, T0, policies, subjects
from shared.money import exponent, to_minor


def subject(amount: int | None = None, currency: str | None = None, **changes) -> Subject:
    fields = dict(tenant_id="t1", subject_type="payment", subject_id="p1", amount=amount,
                  currency=currency if amount is not None else None, metadata={}, maker="maker",
                  requested_by="maker")
    return Subject(**{**fields, **changes})


@given(currency=CURRENCIES, amount=st.integers(1, 10**15))
def test_the_default_policy_is_the_designs_in_every_currency(currency, amount):
    rule = domain.default_policy("t1", "payment").evaluate(subject(amount, currency))
    one_thousand, ten_thousand = to_minor("1000", currency), to_minor("10000", currency)
    expected = 0 if amount < one_thousand else 1 if amount < ten_thousand else 2
    assert rule.required_approvals == expected


@pytest.mark.parametrize(("amount", "currency", "required"), [
    (99_999, "EUR", 0), (100_000, "EUR", 1), (999_999, "EUR", 1), (1_000_000, "EUR", 2),
    (999, "JPY", 0), (1_000, "JPY", 1), (9_999_999, "KWD", 1), (10_000_000, "KWD", 2), (99_999_999, "CLF", 1),
])
def test_the_default_thresholds_respect_the_currency_exponent(amount, currency, required):
    assert domain.default_policy("t1", "payment").evaluate(subject(amount, currency)).required_approvals == required


def test_a_subject_without_an_amount_is_never_waved_through_by_default():
    rule = domain.default_policy("t1", "payee").evaluate(subject(subject_type="payee"))
    assert (rule.name, rule.required_approvals) == ("one_approver_without_amount", 1)


@given(policy=policies(), subject=subjects())
def test_the_first_matching_rule_decides(policy, subject):
    rule = policy.evaluate(subject)
    index = policy.rules.index(rule)
    assert rule.conditions.matches(subject)
    assert not any(earlier.conditions.matches(subject) for earlier in policy.rules[:index])


@given(policy=policies())
def test_a_policy_survives_its_stored_form(policy):
    stored = policy.document()
    again = Policy(id=policy.id, tenant_id=policy.tenant_id, subject_type=policy.subject_type, version=policy.version,
                   rules=tuple(Rule.from_document(r) for r in stored["rules"]),
                   expire_after_seconds=stored["expire_after_seconds"],
                   escalate_after_seconds=stored["escalate_after_seconds"], created_by=policy.created_by,
                   reason=policy.reason, created_at=policy.created_at)
    assert again == policy


def test_explicit_minor_units_win_over_whole_major_units():
    threshold = AmountThreshold(minor_units={"JPY": 50_000}, whole_major_units=1_000)
    assert threshold.in_minor_units("JPY") == 50_000
    assert threshold.in_minor_units("EUR") == 100_000
    assert threshold.in_minor_units("BHD") == 1_000_000
    assert AmountThreshold(minor_units={"EUR": 5}).in_minor_units("USD") is None


def test_conditions_match_what_they_say():
    big_eur = Conditions(amount_at_least=AmountThreshold(minor_units={"EUR": 100}))
    assert big_eur.matches(subject(100, "EUR")) and not big_eur.matches(subject(99, "EUR"))
    assert not big_eur.matches(subject(10**9, "USD"))  # says nothing about USD
    assert not big_eur.matches(subject())  # nor about things without an amount
    payroll = Conditions(metadata={"category": "payroll"}, currencies=frozenset({"EUR"}))
    assert payroll.matches(subject(1, "EUR", metadata={"category": "payroll", "x": "y"}))
    assert not payroll.matches(subject(1, "EUR", metadata={"category": 1}))
    assert not payroll.matches(subject(1, "USD", metadata={"category": "payroll"}))
    interns = Conditions(created_by=frozenset({"intern"}))
    assert interns.matches(subject(maker="intern")) and not interns.matches(subject(maker="boss"))


@pytest.mark.parametrize(("rules", "message"), [
    ((), "at least one rule"),
    ((Rule("big", 1, Conditions(currencies=frozenset({"EUR"}))),), "last rule must have no conditions"),
    ((Rule("same", 1), Rule("same", 0)), "unique"),
])
def test_a_policy_that_cannot_decide_everything_does_not_exist(rules, message):
    with pytest.raises(InvalidPolicy, match=message):
        Policy(id=domain.policy_id_for("t1", "payment"), tenant_id="t1", subject_type="payment", version=1,
               rules=rules)


def test_rules_and_timers_that_could_never_work_are_refused():
    with pytest.raises(InvalidPolicy, match="only 1 approver_principals"):
        Rule("board", 2, approver_principals=("ceo",))
    with pytest.raises(InvalidPolicy, match="required_approvals"):
        Rule("many", 11)
    with pytest.raises(InvalidPolicy, match="shorter than"):
        domain.validate_timers(3600, 3600)
    with pytest.raises(InvalidPolicy, match="whole_major_units"):
        AmountThreshold(whole_major_units=domain.MAX_WHOLE_MAJOR_UNITS + 1)
    with pytest.raises(ValueError, match="ISO 4217"):
        AmountThreshold(minor_units={"XAU": 1})


def test_the_largest_whole_major_threshold_is_still_a_valid_amount_in_every_currency():
    threshold = AmountThreshold(whole_major_units=domain.MAX_WHOLE_MAJOR_UNITS)
    for currency in ("JPY", "EUR", "KWD", "CLF"):
        assert threshold.in_minor_units(currency) <= 10**15
        assert exponent(currency) <= 4


@given(policy=policies())
def test_a_change_is_the_next_version_and_is_audited(policy):
    new, event = policy.next_version(rules=policy.rules, expire_after_seconds=None, escalate_after_seconds=None,
                                     changed_by="admin", reason="tighten", now=T0)
    assert (new.id, new.version) == (policy.id, policy.version + 1)
    assert (event.type, event.aggregate_id, event.reason) == (domain.POLICY_CHANGED, str(policy.id), "tighten")
    EVENT_SCHEMAS[event.type].model_validate(event.payload)
