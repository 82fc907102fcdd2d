"""`clearhouse up` in a subprocess, as a user runs it, for the platform and end-to-end
tests: output read on a thread, Ctrl-C to stop."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Up:
    """`clearhouse up` in a subprocess, its output read line by line on a thread."""

    def __init__(self, home: Path, **env) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "clearhouse", "up"], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "CLEARHOUSE_HOME": str(home), **env})
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip())
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return self.seen
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.seen))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(60)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        while (line := self.lines.get(timeout=5)) is not None:
            self.seen.append(line)
        return code, "\n".join(self.seen)
