"""Configuration of the approvals service, from environment variables."""

from pydantic import Field

from shared.settings import KitSettings


class Settings(KitSettings):
    service_name: str = "approvals"
    port: int = 8002
    # How long a request stays open when its policy does not say (Fineract and most
    # treasury tools default to days, not hours: approvers are people).
    approval_expire_after_s: int = Field(default=72 * 3600, ge=1, le=90 * 24 * 3600)
    # The timer job: how often it looks for overdue requests, and how many per transaction.
    approval_jobs_interval_s: float = Field(default=5.0, gt=0)
    approval_jobs_batch_size: int = Field(default=200, ge=1, le=5000)
    # Where payment.created comes from, and the consumer group (also the inbox's name).
    payments_topic: str = "payments.events"
    approvals_consumer_group: str = "approvals"
