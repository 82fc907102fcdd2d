"""Refunds of payments: `payment.refunded` gives money back to the customer's account,
out of payouts_in_transit, as a journal transaction of kind `payment_refund`.

    payment_refunds   one immutable row per refund: which payment, which transaction,
                      which event; its primary key makes a refund post at most once,
                      however often the event is delivered

Expand only: the kind check gains a value and a new table appears; code that does not
know refunds writes neither.
"""

from alembic import op

from shared.migrate import app_role, grant

revision = "ledger_0004"
down_revision = "ledger_0003"

DDL = [
    "ALTER TABLE transactions DROP CONSTRAINT transactions_kind_check",
    "ALTER TABLE transactions ADD CONSTRAINT transactions_kind_check CHECK "
    "(kind IN ('standard', 'reversal', 'hold_placed', 'hold_posted', 'hold_voided', 'payment_refund')) NOT VALID",
    "ALTER TABLE transactions VALIDATE CONSTRAINT transactions_kind_check",
    "ALTER TABLE transactions ADD CONSTRAINT transactions_refund_names_payment CHECK "
    "(kind <> 'payment_refund' OR payment_id IS NOT NULL) NOT VALID",
    "ALTER TABLE transactions VALIDATE CONSTRAINT transactions_refund_names_payment",
    """
    CREATE TABLE payment_refunds (
        tenant_id      text        NOT NULL,
        refund_id      text        NOT NULL CHECK (length(refund_id) BETWEEN 1 AND 128),
        payment_id     text        NOT NULL CHECK (length(payment_id) BETWEEN 1 AND 128),
        transaction_id uuid        NOT NULL UNIQUE REFERENCES transactions (id),
        amount         bigint      NOT NULL CHECK (amount > 0),
        event_id       uuid        NOT NULL,
        created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (tenant_id, refund_id)
    )
    """,
    "CREATE INDEX payment_refunds_by_payment ON payment_refunds (tenant_id, payment_id)",
    *[
        f"CREATE TRIGGER payment_refunds_{name} BEFORE {op_} ON payment_refunds "
        f"FOR EACH {each} EXECUTE FUNCTION ledger_append_only()"
        for name, op_, each in (("append_only", "UPDATE OR DELETE", "ROW"), ("no_truncate", "TRUNCATE", "STATEMENT"))
    ],
]


def upgrade() -> None:
    for statement in DDL:
        op.execute(statement)
    role = app_role()
    if role:
        op.execute(f'REVOKE ALL ON payment_refunds FROM "{role}"')
    grant("SELECT, INSERT", "payment_refunds")
