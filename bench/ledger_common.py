"""Shared harness of the ledger benchmarks: an embedded PostgreSQL with a migrated ledger
database (production's owner/app role split), the ledger API as a real uvicorn process,
and a lightweight HTTP/1.1 load generator.

The load generator speaks keep-alive HTTP over raw asyncio streams on uvloop: on a
2-core machine that client and server share, an httpx client would spend more CPU per
request than the server does and measure itself. Nothing here is used by the service.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clearhouse.embedded import EmbeddedPostgres, free_port, port_open  # noqa: E402
from clearhouse.provision import ServiceDatabase, provision_database  # noqa: E402
from services.ledger.api import MIGRATIONS  # noqa: E402
from shared import migrate  # noqa: E402
from shared.auth import generate_keypair, sign_internal_token  # noqa: E402


@dataclass
class Platform:
    pg: EmbeddedPostgres
    db: ServiceDatabase
    private_pem: str
    public_pem: str
    workdir: Path


@contextmanager
def embedded_ledger(name: str = "bench"):
    """A fresh embedded PostgreSQL and a migrated ledger database, removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix=f"ledger-{name}-"))
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    pg.start()
    try:
        db = asyncio.run(provision_database(pg.url(), f"ledger_{name}"))
        migrate.upgrade(MIGRATIONS, db.owner_url, db.app_role)
        private_pem, public_pem = generate_keypair()
        yield Platform(pg, db, private_pem, public_pem, workdir)
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class CpuMeter:
    """CPU seconds spent by the API's process tree, the PostgreSQL cluster's processes and
    this process between `start()` and `stop()`: on a 2-core machine shared with other
    work, CPU per transaction says more than wall-clock throughput alone."""

    def __init__(self, platform: Platform, api_pid: int) -> None:
        self.platform, self.api_pid = platform, api_pid
        self._start: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.load_average = 0.0

    @staticmethod
    def _tree(pid: int) -> float:
        import psutil

        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
                if process is root:  # children that already exited (e.g. closed backends)
                    total += times.children_user + times.children_system
            except psutil.NoSuchProcess:
                pass
        return total

    def _sample(self) -> tuple[float, float, float]:
        import psutil

        postmaster = int((self.platform.pg.data_dir / "postmaster.pid").read_text().split()[0])
        mine = psutil.Process().cpu_times()
        return self._tree(self.api_pid), self._tree(postmaster), mine.user + mine.system

    def start(self) -> None:
        self._start = self._sample()

    def stop(self, transactions: int) -> str:
        end = self._sample()
        api, pg, client = (b - a for a, b in zip(self._start, end))
        self.load_average = os.getloadavg()[0]
        per = 1e6 / max(transactions, 1)
        return (f"CPU per transaction: API {api * per:,.0f} µs, PostgreSQL {pg * per:,.0f} µs, load generator "
                f"{client * per:,.0f} µs; machine load average {self.load_average:.1f} on {os.cpu_count()} cores")


@contextmanager
def ledger_api(platform: Platform, *, workers: int = 1, pool_size: int = 40, tracing: bool = True):
    """The ledger API in its own uvicorn process(es), as deployed; yields (host, port, pid)."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": platform.db.app_url,
        "INTERNAL_TOKEN_PUBLIC_KEY": platform.public_pem,
        "DB_POOL_SIZE": str(pool_size),
        "LOG_LEVEL": "WARNING",
        "CLEARHOUSE_TRACES_DIR": str(platform.workdir / "traces"),
        "PYTHONPATH": str(ROOT),
    }
    if not tracing:
        env["OTEL_TRACES_EXPORTER"] = "none"
        env["OTEL_TRACES_SAMPLER"] = "always_off"
    log = open(platform.workdir / f"api-{port}.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.ledger.api:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--workers", str(workers), "--loop", "uvloop", "--http", "httptools",
         "--no-access-log", "--log-level", "warning", "--backlog", "4096"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((platform.workdir / f"api-{port}.log").read_text()[-3000:])
            time.sleep(0.1)
        time.sleep(0.5 * workers)  # every worker has bound and imported
        yield "127.0.0.1", port, process.pid
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def bearer(platform: Platform, tenant: str, scopes=("ledger:read", "ledger:write")) -> str:
    return "Bearer " + sign_internal_token(platform.private_pem, tenant_id=tenant, principal="bench", scopes=scopes,
                                           request_id=uuid.uuid4().hex, ttl_s=3600)


# ── the load generator ───────────────────────────────────────────────────────────────


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: a request, its whole response, then the next."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def open(self) -> HttpConnection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def request(self, method: str, path: str, *, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0
    errors: list[str] = field(default_factory=list)
    answered: int = 0  # every response, warm-up included (what the CPU meter divides by)

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    def summary(self, unit: str = "requests", per_request: int = 1) -> str:
        count = len(self.latencies)
        rate = count * per_request / self.seconds if self.seconds else 0.0
        return (f"{count} requests in {self.seconds:.1f}s → {rate:,.0f} {unit}/s; latency ms p50 "
                f"{self.percentile(0.50):.2f}  p90 {self.percentile(0.90):.2f}  p99 {self.percentile(0.99):.2f}  "
                f"max {self.percentile(1.0):.2f}; statuses {dict(sorted(self.statuses.items()))}")


async def load(host: str, port: int, *, clients: int, duration: float, warmup: float,
               make_request: Callable[[int, int], tuple[str, str, dict[str, str], bytes]],
               expect: frozenset[int] = frozenset({200, 201}),
               on_response: Callable[[int, int, int, bytes], None] | None = None,
               requests_per_client: int | None = None) -> Run:
    """`clients` connections, each sending the next request as soon as the last answered,
    for `warmup` + `duration` seconds; only the `duration` window is measured. With
    `requests_per_client`, each client stops after that many instead (all measured)."""
    run = Run()
    # perf_counter, not loop.time(): uvloop's clock is libuv's cached millisecond time.
    clock = time.perf_counter
    measure_from = clock() + warmup
    stop_at = measure_from + duration
    if requests_per_client is not None:
        measure_from, stop_at = clock(), float("inf")

    async def client(number: int) -> None:
        connection = await HttpConnection(host, port).open()
        sequence = 0
        try:
            while (now := clock()) < stop_at:
                if requests_per_client is not None and sequence >= requests_per_client:
                    break
                method, path, headers, body = make_request(number, sequence)
                sequence += 1
                status, answer = await connection.request(method, path, headers=headers, body=body)
                run.answered += 1
                if on_response is not None:
                    on_response(number, sequence - 1, status, answer)
                if now >= measure_from:
                    run.latencies.append(clock() - now)
                    run.statuses[status] = run.statuses.get(status, 0) + 1
                if status not in expect and len(run.errors) < 5:
                    run.errors.append(f"{status} {answer[:300]!r}")
        finally:
            connection.close()

    await asyncio.gather(*(client(n) for n in range(clients)))
    # Requests started in the window are counted.
    run.started, run.finished = measure_from, (stop_at if requests_per_client is None else clock())
    return run


def json_body(value) -> bytes:
    return orjson.dumps(value)


def use_uvloop() -> None:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def call(host: str, port: int, auth: str, method: str, path: str, body=None) -> tuple[int, dict]:
    connection = await HttpConnection(host, port).open()
    try:
        payload = json_body(body) if body is not None else b""
        status, answer = await connection.request(method, path, headers={
            "Authorization": auth, "Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex},
            body=payload)
        return status, orjson.loads(answer) if answer else {}
    finally:
        connection.close()
