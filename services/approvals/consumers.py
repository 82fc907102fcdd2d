"""Event handlers of the approvals service (none yet: see its issue)."""

from shared.inbox import Consumer


def build_consumers(*, settings, sessionmaker) -> list[Consumer]:
    return []
