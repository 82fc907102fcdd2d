"""The fault injector of the fault suite: finds the processes of one `clearhouse up` (its
own children, never anything else on the machine), SIGKILLs them and waits until the
supervisor has brought a new one up and it answers its health check.

    clearhouse up (pid P) ─┬─ python -m clearhouse serve <service> --role api|relay|consumer
                           ├─ python -m clearhouse serve gateway|sandbox --role api
                           └─ tansu broker  (in memory: a restart comes back empty)
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from clearhouse.embedded import port_open

SERVICES = ("payments", "approvals", "ledger", "reconciliation")
BROKER = "broker"


@dataclass
class Fault:
    at: float  # seconds since the run started
    target: str  # "ledger-relay", "broker", ...
    old_pid: int
    new_pid: int
    recovered_s: float


@dataclass
class Injector:
    home: Path
    up_pid: int
    started: float = field(default_factory=time.monotonic)
    log: list[Fault] = field(default_factory=list)

    def processes(self) -> dict[str, psutil.Process]:
        """The live children of `clearhouse up`, by name (`<service>-<role>` or `broker`)."""
        found = {}
        for child in psutil.Process(self.up_pid).children():
            try:
                argv = child.cmdline()
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                continue
            if "serve" in argv and "--role" in argv:
                at = argv.index("serve")
                found[f"{argv[at + 1]}-{argv[argv.index('--role') + 1]}"] = child
            elif len(argv) > 1 and argv[1] == "broker":
                found[BROKER] = child
        return found

    def _healthy(self, target: str) -> bool:
        ports = json.loads((self.home / "state.json").read_text())["ports"]
        if target == BROKER:
            return port_open("127.0.0.1", ports["broker"])
        name, role = target.rsplit("-", 1)
        path = "/healthz" if role == "api" else "/metrics"
        port = ports[name] if role == "api" else ports[f"{name}-{role}-metrics"]
        try:
            return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    async def kill(self, target: str, *, timeout: float = 120) -> Fault:
        """SIGKILL `target`, then wait for its successor to be up and healthy."""
        victim = self.processes()[target]
        at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        deadline = at + timeout
        while time.monotonic() < deadline:
            successor = self.processes().get(target)
            if successor is not None and successor.pid != victim.pid and await asyncio.to_thread(self._healthy, target):
                fault = Fault(at=round(at - self.started, 1), target=target, old_pid=victim.pid, new_pid=successor.pid,
                              recovered_s=round(time.monotonic() - at, 1))
                self.log.append(fault)
                return fault
            await asyncio.sleep(0.2)
        raise AssertionError(f"{target} (pid {victim.pid}) was not restarted and healthy within {timeout}s; "
                             f"see {self.home / 'logs'}")

    def relay_replays(self, service: str) -> int:
        """How often the service's relay found its topic gone and replayed its log."""
        path = self.home / "logs" / f"{service}-relay.log"
        return path.read_text(errors="replace").count("broker lost its data") if path.exists() else 0
