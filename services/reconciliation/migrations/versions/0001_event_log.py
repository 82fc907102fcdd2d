"""The kit's tables: event log (outbox and audit trail), inbox, consumer failures,
idempotency keys."""

from shared.migrate import create_kit_tables

revision = "reconciliation_0001"
down_revision = None


def upgrade() -> None:
    create_kit_tables()
