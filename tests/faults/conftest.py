"""Options of the fault suite: `--long` (or CLEARHOUSE_FAULT_LONG=1) for the long form,
CLEARHOUSE_FAULT_SEED to replay a run. See docs/reliability.md."""

from __future__ import annotations

import os
import random

import pytest


def pytest_addoption(parser):
    # Registered only when tests/faults is named on the command line (pytest reads the
    # options of such conftests at start-up); the env var works from anywhere.
    parser.addoption("--long", action="store_true", default=False,
                     help="fault suite: the long form (hundreds of payments, many faults)")


@pytest.fixture(scope="session")
def long_form(request) -> bool:
    return bool(request.config.getoption("--long", default=False)) or os.environ.get("CLEARHOUSE_FAULT_LONG") == "1"


@pytest.fixture(scope="session")
def fault_seed() -> int:
    """CLEARHOUSE_FAULT_SEED replays a run; otherwise a fresh seed, printed."""
    seed = int(os.environ.get("CLEARHOUSE_FAULT_SEED") or random.SystemRandom().randrange(1, 2**31))
    print(f"\nfault suite seed: {seed} (replay with CLEARHOUSE_FAULT_SEED={seed})")
    return seed
