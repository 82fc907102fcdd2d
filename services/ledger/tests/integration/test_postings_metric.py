"""Ledger postings per second come from `clearhouse_ledger_transactions_posted_total{kind}`:
one per committed journal transaction, by kind, and none for a refused one."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.ledger.domain import TransactionKind

KINDS = tuple(kind.value for kind in TransactionKind)


def posted() -> dict[str, float]:
    return {kind: REGISTRY.get_sample_value("clearhouse_ledger_transactions_posted_total", {"kind": kind}) or 0.0
            for kind in KINDS}


async def test_each_committed_transaction_is_counted_once_by_kind(api):
    customer = await api.account()
    payouts = await api.account(normal_balance="debit", allow_negative=True)
    before = posted()
    await api.fund(customer, 10_000)
    hold = await api.hold(customer["id"], payouts["id"], 2_500)
    assert hold.status_code == 201, hold.text
    settled = await api.post(f"/v1/ledger/holds/{hold.json()['id']}/post", {})
    assert settled.status_code == 200, settled.text
    refused = await api.transfer(customer["id"], payouts["id"], 1_000_000)  # beyond the balance: nothing posts
    assert refused.status_code == 422, refused.text

    after = posted()
    assert {kind: after[kind] - before[kind] for kind in KINDS} == {
        **dict.fromkeys(KINDS, 0), "standard": 1, "hold_placed": 1, "hold_posted": 1}
