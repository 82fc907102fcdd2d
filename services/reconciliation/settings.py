"""Configuration of the reconciliation service, from environment variables."""

from pydantic import Field

from shared.settings import KitSettings


class Settings(KitSettings):
    service_name: str = "reconciliation"
    port: int = 8004
    # Statement uploads stream to a temporary file; the body is bounded all the same (a
    # day of ten million processor lines as CSV is ~1.2 GB; 2 GiB leaves room).
    statement_max_bytes: int = Field(default=2 * 1024**3, gt=0)
    # Every other request body (JSON) keeps the kit's small limit.
    json_max_bytes: int = Field(default=1024 * 1024, gt=0)
    # The read model applies one small idempotent upsert per event: larger batches share
    # one commit (and its WAL flush) among more events. 2,000 doubles the events/s of the
    # kit's default of 200 (docs/benchmarks-reconciliation.md).
    consumer_batch_size: int = Field(default=2_000, gt=0)
    # Topics and group of the read-model consumer (tests point them at their own topics).
    payments_topic: str = "payments.events"
    ledger_topic: str = "ledger.events"
    read_model_consumer: str = "reconciliation-read-model"
    # The run job loop (in the consumer process).
    run_poll_interval_s: float = Field(default=0.5, gt=0)
    run_lease_s: float = Field(default=600.0, gt=0)
    run_max_attempts: int = Field(default=3, gt=0)
    run_work_mem_mb: int = Field(default=128, ge=4, le=1024)
