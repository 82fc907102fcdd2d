"""Kit tables plus a tiny `counters` aggregate the kit tests write through the unit of work."""

from alembic import op

from shared.migrate import create_kit_tables, grant

revision = "0001"
down_revision = None


def upgrade() -> None:
    create_kit_tables()
    op.execute("CREATE TABLE counters (id text PRIMARY KEY, value bigint NOT NULL DEFAULT 0)")
    grant("SELECT, INSERT, UPDATE", "counters")
