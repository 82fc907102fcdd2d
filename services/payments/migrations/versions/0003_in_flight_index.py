"""A small index over the payments still in flight (pending_approval, approved, submitted),
for the gauges the consumer process exports (services/payments/gauges.py): how many wait
in each status and since when, read without scanning the settled history.

Built CONCURRENTLY, so it can run while the previous version serves (expand only).
"""

from alembic import op

revision = "payments_0003"
down_revision = "payments_0002"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS payments_in_flight ON payments (status, updated_at) "
                   "WHERE status IN ('pending_approval', 'approved', 'submitted')")
