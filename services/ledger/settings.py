"""Configuration of the ledger service, from environment variables."""

from shared.settings import KitSettings


class Settings(KitSettings):
    service_name: str = "ledger"
    port: int = 8003
    # How often the consumer process voids holds whose expiry has passed (at most this
    # late), and how many it voids per transaction.
    hold_expiry_interval_s: float = 1.0
    hold_expiry_batch_size: int = 100
