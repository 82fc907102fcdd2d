"""Plumbing shared by the payments benchmarks: an embedded PostgreSQL with a migrated
payments database, the payments API as a real uvicorn process started the way
`clearhouse serve payments` starts it, and latency statistics.

Everything runs on this machine; the load generator, the API and PostgreSQL share its
cores, which the figures must be read against (docs/benchmarks-payments.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clearhouse.embedded import EmbeddedPostgres, free_port  # noqa: E402
from clearhouse.provision import provision_database  # noqa: E402
from services.payments.api import MIGRATIONS  # noqa: E402
from shared import migrate  # noqa: E402
from shared.auth import generate_keypair  # noqa: E402

WEBHOOK_SECRET = "whsec_bench_" + "x" * 20


@dataclass
class Platform:
    pg: EmbeddedPostgres
    workdir: Path
    app_url: str
    private_pem: str
    public_pem: str
    env: dict[str, str]


@contextlib.contextmanager
def embedded_platform():
    workdir = Path(tempfile.mkdtemp(prefix="clearhouse-bench-"))
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    pg.start()
    try:
        db = asyncio.run(provision_database(pg.url(), "bench_payments"))
        migrate.upgrade(MIGRATIONS, db.owner_url, db.app_role)
        private_pem, public_pem = generate_keypair()
        env = {
            "DATABASE_URL": db.app_url,
            "INTERNAL_TOKEN_PUBLIC_KEY": public_pem,
            "PAYMENTS_PAYEE_KEYS": json.dumps({"bench": base64.b64encode(os.urandom(32)).decode()}),
            "PAYMENTS_PAYEE_KEY_ID": "bench",
            "PAYMENTS_SANDBOX_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # the API process never talks to the broker
            "CLEARHOUSE_TRACES_DIR": str(workdir / "traces"),
            "CLEARHOUSE_HOME": str(workdir),
            "LOG_LEVEL": "WARNING",
        }
        yield Platform(pg, workdir, db.app_url, private_pem, public_pem, env)
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def payments_api(platform: Platform, *, workers: int = 1, extra_env: dict[str, str] | None = None):
    """The payments API in its own process(es); yields (base URL, its pid)."""
    port = free_port()
    env = {**os.environ, **platform.env, **(extra_env or {}), "PORT": str(port), "PYTHONUNBUFFERED": "1"}
    if workers == 1:  # exactly what `clearhouse up` runs
        argv = [sys.executable, "-m", "clearhouse", "serve", "payments", "--role", "api", "--port", str(port)]
    else:
        argv = [sys.executable, "-m", "uvicorn", "services.payments.api:create_app", "--factory", "--port",
                str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    log = (platform.workdir / "api.log").open("ab")
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the payments API did not start; see {platform.workdir / 'api.log'}")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (uvicorn workers, PostgreSQL
    backends): the cost of the work whatever else the machine is doing."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total
    except psutil.Error:
        return 0.0


def postmaster_pid(platform: Platform) -> int:
    return int((platform.pg.data_dir / "postmaster.pid").read_text().split()[0])


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    return (f"p50 {percentile(ordered, 0.50) * 1000:.1f} ms, p90 {percentile(ordered, 0.90) * 1000:.1f} ms, "
            f"p99 {percentile(ordered, 0.99) * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms")


class Connection:
    """A minimal keep-alive HTTP/1.1 client connection for load generation.

    httpx costs the generator about as much CPU per request as the server spends; on a
    2-core machine that CPU is taken from the service under test. This speaks just
    enough HTTP/1.1 (Content-Length bodies, keep-alive) for POSTs to our own API."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}",
                *(f"{k}: {v}" for k, v in headers.items())]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        payload = await self.reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port)
