"""Payment orders, the payee vault, refunds, processor attempts and the webhook inbox.

`payments` and `refunds` are projections of the event log (rebuildable from it); the
payee vault holds the only copy of payee PII, encrypted, written once; the attempts table
is the submission work queue; the webhook inbox deduplicates processor events. The
runtime role may not DELETE anything here, nor UPDATE the vault or the inbox.
"""

from alembic import op

from shared.migrate import grant

revision = "payments_0002"
down_revision = "payments_0001"

PAYMENT_STATUSES = ("pending_approval", "approved", "submitted", "settled", "failed", "rejected", "cancelled",
                    "partially_refunded", "refunded")
REFUND_STATUSES = ("pending", "submitted", "succeeded", "failed")
ATTEMPT_STATUSES = ("pending", "sending", "submitted", "unknown", "completed", "rejected", "cancelled")
WEBHOOK_OUTCOMES = ("applied", "duplicate", "stale", "conflict", "unmatched")


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def upgrade() -> None:
    op.execute(f"""
    CREATE TABLE payments (
        id                   uuid        PRIMARY KEY,
        tenant_id            text        NOT NULL,
        status               text        NOT NULL CHECK (status IN ({_in(PAYMENT_STATUSES)})),
        amount               bigint      NOT NULL CHECK (amount > 0 AND amount <= 1000000000000000),
        currency             text        NOT NULL CHECK (currency ~ '^[A-Z]{{3}}$'),
        debit_account_id     text        NOT NULL,
        reference            text        NOT NULL,
        metadata             jsonb       NOT NULL DEFAULT '{{}}',
        payee_name_masked    text        NOT NULL,
        payee_iban_masked    text        NOT NULL
                             CHECK (payee_iban_masked ~ '^[A-Z]{{2}}[0-9]{{2}}[*]{{8}}[A-Z0-9]{{4}}$'),
        created_by           text        NOT NULL,
        failure_reason       text,
        cancellation_reason  text,
        approval_id          text,
        hold_id              text,
        processor            text,
        processor_payment_id text,
        value_date           date,
        refunded_amount      bigint      NOT NULL DEFAULT 0 CHECK (refunded_amount >= 0 AND refunded_amount <= amount),
        version              integer     NOT NULL CHECK (version > 0),
        created_at           timestamptz NOT NULL,
        updated_at           timestamptz NOT NULL,
        CHECK (status NOT IN ('failed', 'rejected') OR failure_reason IS NOT NULL),
        CHECK (status NOT IN ('approved', 'submitted', 'settled', 'partially_refunded', 'refunded')
               OR approval_id IS NOT NULL),
        -- money never leaves before it is reserved
        CHECK (status NOT IN ('submitted', 'settled', 'partially_refunded', 'refunded')
               OR (hold_id IS NOT NULL AND processor_payment_id IS NOT NULL)),
        CHECK (status NOT IN ('settled', 'partially_refunded', 'refunded') OR value_date IS NOT NULL),
        CHECK ((status = 'refunded') = (refunded_amount = amount))
    )
    """)
    # Keyset pagination, newest first, per tenant (and per tenant and status).
    op.execute("CREATE INDEX payments_by_tenant ON payments (tenant_id, created_at DESC, id DESC)")
    op.execute("CREATE INDEX payments_by_tenant_status ON payments (tenant_id, status, created_at DESC, id DESC)")
    op.execute("CREATE UNIQUE INDEX payments_processor_payment_id ON payments (processor, processor_payment_id) "
               "WHERE processor_payment_id IS NOT NULL")

    op.execute("""
    CREATE TABLE payee_vault (
        payment_id      uuid        PRIMARY KEY REFERENCES payments (id),
        tenant_id       text        NOT NULL,
        key_id          text        NOT NULL,
        name_ciphertext bytea       NOT NULL CHECK (length(name_ciphertext) > 28),
        iban_ciphertext bytea       NOT NULL CHECK (length(iban_ciphertext) > 28),
        created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """)

    op.execute(f"""
    CREATE TABLE refunds (
        id                  uuid        PRIMARY KEY,
        tenant_id           text        NOT NULL,
        payment_id          uuid        NOT NULL REFERENCES payments (id),
        status              text        NOT NULL CHECK (status IN ({_in(REFUND_STATUSES)})),
        amount              bigint      NOT NULL CHECK (amount > 0 AND amount <= 1000000000000000),
        currency            text        NOT NULL CHECK (currency ~ '^[A-Z]{{3}}$'),
        reason              text,
        failure_reason      text,
        processor_refund_id text,
        created_by          text        NOT NULL,
        version             integer     NOT NULL CHECK (version > 0),
        created_at          timestamptz NOT NULL,
        updated_at          timestamptz NOT NULL,
        CHECK (status <> 'failed' OR failure_reason IS NOT NULL),
        CHECK (status NOT IN ('submitted', 'succeeded') OR processor_refund_id IS NOT NULL)
    )
    """)
    op.execute("CREATE INDEX refunds_by_payment ON refunds (payment_id, created_at, id)")

    op.execute(f"""
    CREATE TABLE processor_attempts (
        id                  uuid        PRIMARY KEY,  -- sent as the processor's idempotency key
        tenant_id           text        NOT NULL,
        kind                text        NOT NULL CHECK (kind IN ('payout', 'refund')),
        payment_id          uuid        NOT NULL REFERENCES payments (id),
        refund_id           uuid        REFERENCES refunds (id),
        processor           text        NOT NULL,
        status              text        NOT NULL CHECK (status IN ({_in(ATTEMPT_STATUSES)})),
        tries               integer     NOT NULL DEFAULT 0 CHECK (tries >= 0),
        next_attempt_at     timestamptz NOT NULL,
        lease_until         timestamptz,
        processor_object_id text,
        last_error          text,
        correlation_id      text,
        traceparent         text,
        created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
        CHECK ((kind = 'refund') = (refund_id IS NOT NULL))
    )
    """)
    # One payout per payment, one request per refund, ever: the attempt id is the
    # processor's idempotency key for the life of the payment, so no retry, restart or
    # redelivery can make the processor pay twice.
    op.execute("CREATE UNIQUE INDEX one_payout_per_payment ON processor_attempts (payment_id) WHERE kind = 'payout'")
    op.execute("CREATE UNIQUE INDEX one_request_per_refund ON processor_attempts (refund_id) WHERE kind = 'refund'")
    op.execute("CREATE INDEX attempts_due ON processor_attempts (next_attempt_at) "
               "WHERE status IN ('pending', 'sending', 'submitted', 'unknown')")

    op.execute(f"""
    CREATE TABLE processor_webhook_events (
        processor   text        NOT NULL,
        event_id    text        NOT NULL,
        event_type  text        NOT NULL,
        attempt_id  uuid,
        outcome     text        NOT NULL CHECK (outcome IN ({_in(WEBHOOK_OUTCOMES)})),
        received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (processor, event_id)
    )
    """)

    grant("SELECT, INSERT, UPDATE", "payments")
    grant("SELECT, INSERT", "payee_vault")
    grant("SELECT, INSERT, UPDATE", "refunds")
    grant("SELECT, INSERT, UPDATE", "processor_attempts")
    grant("SELECT, INSERT", "processor_webhook_events")
