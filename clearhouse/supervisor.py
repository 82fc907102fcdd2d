"""Runs the platform's processes as children, restarts the ones that die, and stops them
all cleanly. Plain subprocesses: what Kubernetes does with Deployments, for a laptop.

It never decides what runs (see `clearhouse.up`); it only keeps it running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class ProcessSpec:
    name: str  # e.g. "ledger-api"
    argv: list[str]
    env: dict[str, str]
    health_url: str  # answers 200 when the process is up
    log_path: Path


@dataclass
class Child:
    spec: ProcessSpec
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    crash_times: list[float] = field(default_factory=list)


class Supervisor:
    def __init__(self, specs: list[ProcessSpec]) -> None:
        self.children = [Child(spec) for spec in specs]

    def start_all(self) -> None:
        for child in self.children:
            self._start(child)

    def _start(self, child: Child) -> None:
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = spec.log_path.open("ab")
        env = {**os.environ, **spec.env}
        child.process = subprocess.Popen(spec.argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        child.started_at = time.monotonic()

    def wait_healthy(self, timeout: float, progress=None) -> list[str]:
        """Wait until every child answers its health URL; returns the names that did not."""
        deadline = time.monotonic() + timeout
        pending = {c.spec.name: c for c in self.children}
        with httpx.Client(timeout=0.5) as client:
            while pending and time.monotonic() < deadline:
                for name, child in list(pending.items()):
                    if child.process and child.process.poll() is not None:
                        return [f"{name} exited with code {child.process.returncode} (log: {child.spec.log_path})"]
                    try:
                        if client.get(child.spec.health_url).status_code == 200:
                            del pending[name]
                            if progress:
                                progress(name, len(self.children) - len(pending), len(self.children))
                    except httpx.HTTPError:
                        pass
                time.sleep(0.1)
        return [f"{name} not healthy within {timeout:.0f}s (log: {c.spec.log_path})" for name, c in pending.items()]

    def watch(self, stop_requested, *, also: Sequence[Callable[[], object]] = ()) -> None:
        """Restart children that exit, with backoff, until `stop_requested()` is true.
        `also`: checks run on every tick for servers started outside the supervisor (the
        embedded broker), each restarting its server if it died; a death must never stop
        the platform."""
        while not stop_requested():
            for check in also:
                check()
            now = time.monotonic()
            for child in self.children:
                proc = child.process
                if proc is not None and proc.poll() is None:
                    continue
                if proc is not None:
                    child.crash_times = [t for t in child.crash_times if now - t < 60] + [now]
                    delay = min(30.0, 0.5 * 2 ** (len(child.crash_times) - 1))
                    print(f"  ! {child.spec.name} exited with code {proc.returncode}; restarting in {delay:.1f}s "
                          f"(log: {child.spec.log_path})", file=sys.stderr, flush=True)
                    child.process = None
                    child.next_start = now + delay
                if now >= child.next_start:
                    child.restarts += 1
                    self._start(child)
            time.sleep(0.2)

    def stop_all(self, timeout: float = 10.0) -> None:
        for child in self.children:
            if child.process and child.process.poll() is None:
                try:
                    os.killpg(child.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for child in self.children:
            if not child.process:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(child.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.process.wait()
