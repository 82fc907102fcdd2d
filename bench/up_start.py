"""How long `clearhouse up` takes until every process is healthy: a first start (initdb,
databases, migrations) and a second start on the same data, in a throwaway home.

    .venv/bin/python bench/up_start.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_once(home: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "clearhouse", "up"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "CLEARHOUSE_HOME": str(home)})
    try:
        for line in proc.stdout:
            if "Clearhouse is up" in line:
                return time.perf_counter() - started
        raise SystemExit(f"up exited with {proc.wait()} before it was ready")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="clearhouse-up-") as tmp:
        home = Path(tmp) / "home"
        first = start_once(home)
        second = start_once(home)
    print(f"clearhouse up ready: first start {first:.1f} s, second start {second:.1f} s (target ≤ 15 s)")


if __name__ == "__main__":
    main()
