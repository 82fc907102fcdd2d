"""A payment's hold never expires: once a payment is reserved, only the payment's own
outcome (settled → post, failed/cancelled → void) may release it. If the expiry job
could void it, money could leave through the processor while the ledger had already
given the funds back.

Added NOT VALID and validated in a second step, so the check never blocks writers for
longer than a scan (expand only; the consumers never set an expiry on a payment hold).
"""

from alembic import op

revision = "ledger_0003"
down_revision = "ledger_0002"


def upgrade() -> None:
    op.execute("ALTER TABLE holds ADD CONSTRAINT holds_payment_never_expires "
               "CHECK (payment_id IS NULL OR expires_at IS NULL) NOT VALID")
    op.execute("ALTER TABLE holds VALIDATE CONSTRAINT holds_payment_never_expires")
