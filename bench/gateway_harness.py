"""What the gateway benchmarks share: real processes (uvicorn per service and for the
gateway, nginx), a throwaway embedded PostgreSQL, and a lean HTTP/1.1 load generator.

The load generator writes pre-built request bytes on keep-alive connections and parses
only the status line and Content-Length (or chunks), so on a two-core machine it takes
as little CPU as possible away from what is measured; every target is driven by the same
code in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from clearhouse.embedded import EmbeddedPostgres, free_port, port_open
from clearhouse.provision import ServiceDatabase, provision_database
from shared import migrate

ROOT = Path(__file__).resolve().parent.parent


def migrations(component: str) -> Path:
    return ROOT / ("gateway" if component == "gateway" else f"services/{component}") / "migrations"


@dataclass
class Processes:
    workdir: Path
    started: list[subprocess.Popen] = field(default_factory=list)
    by_name: dict[str, subprocess.Popen] = field(default_factory=dict)

    def cpu_seconds(self, name: str) -> float:
        """User + system CPU of a started process and its children (nginx's worker)."""
        process = psutil.Process(self.by_name[name].pid)
        total = 0.0
        for each in [process, *process.children(recursive=True)]:
            times = each.cpu_times()
            total += times.user + times.system
        return total

    def start(self, name: str, argv: list[str], env: dict[str, str], port: int, timeout: float = 30.0) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.started.append(process)
        self.by_name[name] = process
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {self.workdir / (name + '.log')}:\n"
                                   + (self.workdir / f"{name}.log").read_text()[-3000:])
            time.sleep(0.05)

    def uvicorn(self, name: str, factory: str, port: int, env: dict[str, str]) -> str:
        self.start(name, [sys.executable, "-m", "uvicorn", factory, "--factory", "--host", "127.0.0.1",
                          "--port", str(port), "--no-access-log", "--log-level", "warning"], env, port)
        return f"http://127.0.0.1:{port}"

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def platform():
    """(admin url, Processes, workdir) on a throwaway embedded PostgreSQL."""
    workdir = Path(tempfile.mkdtemp(prefix="clearhouse-gwbench-"))
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    processes = Processes(workdir)
    try:
        pg.start()
        yield pg.url(), processes, workdir
    finally:
        processes.stop_all()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def database(admin_url: str, component: str) -> ServiceDatabase:
    db = await provision_database(admin_url, f"bench_{component}")
    await asyncio.to_thread(migrate.upgrade, migrations(component), db.owner_url, db.app_role)
    return db


# Spans are still made (the instrumentation runs as in production) but not written out:
# the file exporter's disk writes would be measured too, and nobody reads them here.
QUIET = {"OTEL_TRACES_EXPORTER": "none", "PYTHONUNBUFFERED": "1"}


def start_nginx(processes: Processes, upstream_port: int) -> str:
    """nginx `proxy_pass` to the upstream with keep-alive connections: the floor."""
    port = free_port()
    conf = processes.workdir / "nginx.conf"
    work = processes.workdir
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;  # the load generator keeps its connections for the whole run
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    upstream service {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit("nginx is not installed: apt-get install -y nginx")
    processes.start("nginx", [nginx, "-c", str(conf), "-p", str(work)], {}, port)
    return f"http://127.0.0.1:{port}"


# --- load generation -------------------------------------------------------------------


class Connection:
    def __init__(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.port, self.reader, self.writer = port, reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(port, reader, writer)

    async def _reconnect(self) -> None:
        self.writer.close()
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        # A pooled connection may have idled past the server's keep-alive timeout (uvicorn:
        # 5 s) and been closed by it, as any HTTP client's pool must expect: reconnect, and
        # resend once if the server closed it before answering a byte.
        if self.writer.is_closing() or self.reader.at_eof():
            await self._reconnect()
        self.writer.write(request)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            if getattr(exc, "partial", b""):
                raise
            await self._reconnect()
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, closing = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                closing = True
        if chunked:
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await self.reader.readexactly(length or 0)
        if closing:
            self.writer.close()
        return status, body

    def close(self) -> None:
        self.writer.close()


def request_bytes(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bench"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Result:
    latencies: list[float]
    seconds: float
    errors: dict[int, int]

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, p: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] * 1000


async def closed_loop(port: int, make: Callable[[], bytes], *, concurrency: int, seconds: float,
                      expect: int) -> Result:
    """`concurrency` connections, each sending its next request when the last answered."""
    connections = [await Connection.open(port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    async def worker(conn: Connection) -> None:
        while time.perf_counter() < deadline:
            request = make()
            started = time.perf_counter()
            status, body = await conn.exchange(request)
            if status == expect:
                latencies.append(time.perf_counter() - started)
            else:
                errors[status] = errors.get(status, 0) + 1
                if len(errors) == 1 and errors[status] == 1:
                    print(f"    unexpected {status}: {body[:300]!r}", flush=True)

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = time.perf_counter() - started
    for conn in connections:
        conn.close()
    return Result(latencies, elapsed, errors)


async def open_loop(port: int, make: Callable[[], bytes], *, rate: float, seconds: float, expect: int) -> Result:
    """Requests sent on a fixed schedule whatever the answers do (no coordinated omission):
    each latency counts from the scheduled send time."""
    idle: list[Connection] = []
    latencies: list[float] = []
    errors: dict[int, int] = {}
    total = int(rate * seconds)
    start = time.perf_counter() + 0.1

    async def one(i: int) -> None:
        scheduled = start + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        conn = idle.pop() if idle else await Connection.open(port)
        status, body = await conn.exchange(make())
        done = time.perf_counter()
        idle.append(conn)
        if status == expect:
            latencies.append(done - scheduled)
        else:
            errors[status] = errors.get(status, 0) + 1
            if sum(errors.values()) == 1:
                print(f"    unexpected {status}: {body[:300]!r}", flush=True)

    await asyncio.gather(*(one(i) for i in range(total)))
    elapsed = time.perf_counter() - start
    for conn in idle:
        conn.close()
    return Result(latencies, elapsed, errors)
